"""Scanning: every ``*RotaryEmbedding`` class the installed transformers
ships, found by importing its modeling modules (seconds; only tools call this,
never the patching path).

:func:`scan_catalog` imports every torch modeling module (or only those whose
model type matches a pattern) and collects the rotary classes each defines,
with the modules that failed to import.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable

from rope_patch.discovery import (
    RotaryClass,
    declared_rotary_names,
    model_type_of,
    modeling_module_names,
    rotary_classes,
)
from rope_patch.settings import name_matches

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImportFailure:
    """A modeling module that failed to import.

    Attributes:
        module: its dotted name.
        error: the exception (traceback dropped, so no frames are kept alive).
    """

    module: str
    error: BaseException

    @property
    def reason(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"

    @property
    def missing_package(self) -> str | None:
        """The optional package whose absence made the import fail, if that is why."""
        if isinstance(self.error, ModuleNotFoundError) and self.error.name:
            return self.error.name.split(".")[0]
        return None


@dataclasses.dataclass(frozen=True)
class Catalog:
    """What :func:`scan_catalog` found.

    Attributes:
        rotaries: every rotary class, ordered by module then class name.
        failures: the modules that failed to import (skipped).
        modules: how many modules were imported or tried.
    """

    rotaries: list[RotaryClass]
    failures: list[ImportFailure]
    modules: int


def candidate_modules(pattern: str | None = None) -> list[str]:
    """The modeling modules to import for ``pattern``: every one, or those
    whose model type or a declared rotary class name matches it (read from
    the source files, so nothing is imported to decide)."""
    names = modeling_module_names()
    if not pattern:
        return names
    return [
        name
        for name in names
        if name_matches(pattern, model_type_of(name), "")
        or any(name_matches(pattern, model_type_of(name), cls) for cls in declared_rotary_names(name))
    ]


def scan_catalog(progress: Callable[[int, int, str], None] | None = None, pattern: str | None = None) -> Catalog:
    """Import the torch modeling modules and collect their rotary classes.

    Args:
        progress: called as ``progress(i, total, module_name)`` before each
            module is imported, ``i`` counting from 1.
        pattern: only modules and classes whose model type or class name it
            matches (see :func:`rope_patch.settings.name_matches`).

    Returns:
        A :class:`Catalog`; modules that fail to import are listed in its
        ``failures`` (and logged at debug) instead of raising.
    """
    names = candidate_modules(pattern)
    rotaries: list[RotaryClass] = []
    failures: list[ImportFailure] = []
    for i, name in enumerate(names, start=1):
        if progress is not None:
            progress(i, len(names), name)
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - one broken model must not hide the rest
            logger.debug("skipping %s: %s: %s", name, type(exc).__name__, exc)
            failures.append(ImportFailure(name, exc.with_traceback(None)))
            continue
        found = rotary_classes(module)
        rotaries.extend(r for r in found if not pattern or name_matches(pattern, r.model_type, r.name))
    return Catalog(rotaries=rotaries, failures=failures, modules=len(names))
