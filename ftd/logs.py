"""`ftd.log_to_stderr()`: ftd's messages on stderr for a script that configures no logging.

ftd logs through `logging` under the names `ftd.*` and never configures logging itself. With no
handler anywhere, Python's last-resort handler prints WARNING and above only, without a time or
a logger name: the INFO lines (what a restore recovered, from where, in how long) are lost.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler log_to_stderr installs (told apart from the application's own)."""


def log_to_stderr(level: int | str | None = None) -> logging.Handler:
    """Print the `ftd` loggers' records at `level` and above to stderr (default: FTD_LOG_LEVEL, else INFO).

    Calling it again changes the level and returns the same handler. Records also propagate to
    the root logger as usual, so a script that configures the root logger needs none of this.
    """
    logger = logging.getLogger("ftd")
    if level is None:
        level = os.environ.get("FTD_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    handler.setLevel(level)
    logger.setLevel(level)
    return handler
