"""The one base class of the errors a user fixes, not the code.

Each package error that describes bad input subclasses ``UserError`` next to its old base
(``class ConfigError(UserError, ValueError)``), so callers that catch ``ValueError`` or
``RuntimeError`` keep working while the jobs tell the two apart (``mpformer_ray.cli``).
"""

from __future__ import annotations


class UserError(Exception):
    """What the user must fix: a config, data, checkpoint or storage location. The message names what
    is wrong and the fix; a job prints it as one ``error: ...`` line, without a traceback, and exits
    with status 2."""
