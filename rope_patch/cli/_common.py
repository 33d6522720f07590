"""Option types and helpers shared by the ``rope-patch`` commands.

Nothing here imports torch at module level: ``rope-patch info`` and
``rope-patch run`` must start fast and work where torch is broken.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

import click

import rope_patch

#: ``--dtype`` choices; names of torch dtypes.
DTYPES = ("float32", "bfloat16", "float16")
#: ``--device`` choices.
DEVICES = ("cpu", "cuda")


def torch_dtype(name: str):
    """The torch dtype called ``name`` (one of DTYPES)."""
    import torch

    return getattr(torch, name)


def check_device(device: str, option: str = "--device") -> str:
    """``device`` if torch can use it here; a usage error (exit 2) otherwise."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available to torch on this machine", param_hint=option)
    return device


@contextlib.contextmanager
def quiet(*names: str, level: int = logging.ERROR):
    """Raise the level of the named loggers for the duration of the block.

    The commands report reasons in their own output; the same reasons logged
    as warnings (once per class) would only repeat them on stderr.
    """
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=False):
            logger.setLevel(old)


class Progress:
    """``\\r``-updated progress line on stderr, only when stderr is a terminal
    (so pipes, logs and CI output stay clean)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._width = 0

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        line = f"{done}/{total} {what}"[:100]
        click.echo("\r" + line.ljust(self._width), nl=False, err=True)
        self._width = len(line)

    def clear(self) -> None:
        """Erase the progress line."""
        if self.enabled and self._width:
            click.echo("\r" + " " * self._width + "\r", nl=False, err=True)
            self._width = 0


@contextlib.contextmanager
def patched_like_auto():
    """Patching as ``import rope_patch.auto`` does it (environment settings),
    undone afterwards; an existing patch (``rope-patch run -- rope-patch
    list``) is used as it is."""
    ours = not rope_patch.is_patched() and rope_patch.patch()
    try:
        yield
    finally:
        if ours:
            rope_patch.unpatch()


@contextlib.contextmanager
def model_code_contained():
    """Keep model code's chatter off stdout and the terminal.

    Importing modeling modules can ``print`` (transformers' auto_docstring
    reports missing configs on stdout), which would corrupt ``--json``;
    default configs log validation warnings; the runtime logs each fallback,
    which the rows already report.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger()  # configures its level now, so quiet() is not overridden on first use
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), quiet("transformers", "rope_patch"):
        warnings.simplefilter("ignore")
        yield
