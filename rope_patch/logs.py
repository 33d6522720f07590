"""How much rope_patch says, and where.

By default rope_patch leaves its logger (``rope_patch``) to the
application: only warnings reach a user who configured nothing (Python's
last-resort handler prints WARNING and above), and rope_patch warns only
where the user should act. ``ROPE_PATCH_VERBOSITY`` (read with the other
variables, rope_patch.settings) asks for more or less:

- ``info``: what rope_patch decided: each table built (class, device, dtype,
  positions, bytes) and each class computed unpatched, with the reason;
- ``debug``: also why forms and candidate configs were not taken;
- ``error``: not even warnings.

A level other than the default gets one handler on stderr, and messages
then stop propagating to the root logger (they would print twice where the
application configured logging too), as transformers' own
TRANSFORMERS_VERBOSITY does.
"""

from __future__ import annotations

import logging
import sys

#: The library's logger, parent of every rope_patch.* module logger.
LOGGER = "rope_patch"
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
DEFAULT = "warning"

_handler: logging.Handler | None = None


def configure(verbosity: str) -> None:
    """Apply ``verbosity`` (a key of LEVELS) to the ``rope_patch`` logger.

    The default level leaves the logger as the application set it; another
    level sets it and adds one stderr handler (once).
    """
    global _handler
    logger = logging.getLogger(LOGGER)
    if verbosity == DEFAULT and _handler is None:
        return
    logger.setLevel(LEVELS[verbosity])
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(_handler)
        logger.propagate = False
