"""How every job in jobs/ starts and ends.

A job file keeps one line of its own before importing this package, the repository root on
``sys.path`` (so ``python jobs/x.py`` and ``ray job submit --working-dir .`` import the package from
a clone without installing it), and decorates its ``main(argv) -> exit status`` with ``job``:

    @job
    def main(argv: list[str] | None = None) -> int: ...

    if __name__ == "__main__":
        sys.exit(main())

Exit statuses, the same for every job:

    what main returns   0 on success; a job may return 2 itself for bad input it finds (one ``error:`` line)
    2                   a ``UserError`` (bad config, data, checkpoint, storage): ``error: <message>``, no traceback
    130                 Ctrl-C (KeyboardInterrupt) that main does not handle itself: ``interrupted``
    1                   any other exception: a bug, so its traceback
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable

from mpformer_ray.errors import UserError
from mpformer_ray.log import setup_logging

Main = Callable[[list[str] | None], int]


def job(main: Main) -> Main:
    """``main`` with the package's logging set up first and its exceptions turned into exit statuses
    (module docstring). Called in-process, as tests do, it returns the status the command would exit with."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception:
            traceback.print_exc()
            return 1

    return run
