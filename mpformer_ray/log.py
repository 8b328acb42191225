"""One logging setup for every job: this package's INFO lines on stderr, other libraries untouched."""

from __future__ import annotations

import logging


def setup_logging() -> None:
    """Show ``mpformer_ray`` INFO lines (progress, checkpoints, metrics) on stderr without turning on
    every library's INFO logging (Ray's own would bury them). Idempotent."""
    logger = logging.getLogger("mpformer_ray")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def format_eta(seconds: float) -> str:
    """``seconds`` as H:MM:SS, for progress lines."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
