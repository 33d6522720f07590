"""Configuration: the ROPE_PATCH_* environment variables, parsed in one place.

The variables are read once, by :func:`from_environment`, when patching starts
(``import rope_patch.auto`` or ``rope_patch.patch()``); the hot path never
reads the environment. Precedence: defaults < environment < explicit arguments
to :func:`rope_patch.patch`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping

from rope_patch import logs

logger = logging.getLogger(__name__)

#: ``1``/``true``/``yes``/``on`` makes ``import rope_patch.auto`` patch nothing.
DISABLE = "ROPE_PATCH_DISABLE"
#: Comma-separated model types or class names (case-insensitive) to leave
#: untouched; each may be a glob (``qwen3*``); ``*`` means every class.
EXCLUDE = "ROPE_PATCH_EXCLUDE"
#: ``1`` turns on the sync-free mode on accelerators: tables are pre-sized to
#: the model's max_position_embeddings and positions are not bound-checked.
SYNC_FREE = "ROPE_PATCH_SYNC_FREE"
#: Largest table (in positions) a module may grow; positions beyond it take
#: the unpatched path. Default: max(max_position_embeddings, 65536).
MAX_POSITIONS = "ROPE_PATCH_MAX_POSITIONS"
#: How much rope_patch logs: ``error``, ``warning`` (default), ``info`` (each
#: table built, each class computed unpatched and why) or ``debug``.
VERBOSITY = "ROPE_PATCH_VERBOSITY"

#: Every variable with a one-line meaning, for the CLI's ``info`` and the README.
VARIABLES: Mapping[str, str] = {
    DISABLE: "1 disables rope_patch.auto entirely (nothing is patched)",
    EXCLUDE: "comma list of model types or class names (globs such as qwen3*) to leave unpatched; * for all",
    SYNC_FREE: "1 pre-sizes tables to max_position_embeddings and skips the bound check "
    "on accelerators (no host sync; you guarantee positions are in range)",
    MAX_POSITIONS: "largest table size in positions; larger positions are computed unpatched",
    VERBOSITY: "error, warning (default), info (each table built, each class computed unpatched and why) or debug",
}

DEFAULT_MIN_CAP = 65536

_TRUE = {"1", "true", "yes", "on"}
#: Characters a name or glob may hold besides letters and digits.
_NAME_PUNCTUATION = str.maketrans("", "", "_-.*?[]!")
_FALSE = {"", "0", "false", "no", "off"}


class SettingsError(ValueError):
    """A ROPE_PATCH_* variable holds a value that cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to patch and how.

    Attributes:
        disabled: patch nothing at all.
        exclude: lower-cased model types / class names to leave untouched,
            each an exact name or a glob (see :func:`name_matches`).
        sync_free: on accelerators, pre-size tables and skip the bound check.
        max_positions: table size cap in positions, or None for the default.
        verbosity: how much the ``rope_patch`` logger says (rope_patch.logs).
        problem: why the environment could not be used (then ``disabled``).
    """

    disabled: bool = False
    exclude: frozenset[str] = frozenset()
    sync_free: bool = False
    max_positions: int | None = None
    verbosity: str = logs.DEFAULT
    problem: str | None = None

    def excludes(self, model_type: str, class_name: str) -> bool:
        """Whether the class ``class_name`` of ``model_type`` is excluded."""
        return any(name_matches(pattern, model_type, class_name) for pattern in self.exclude)

    def replace(self, **changes) -> Settings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


#: The settings of the patch in effect (set by ``rope_patch.patch()``), or None.
active: Settings | None = None


_GLOB_CHARACTERS = "*?["


def name_matches(pattern: str, model_type: str, class_name: str) -> bool:
    """Whether ``pattern`` names the model type or the class: an exact name
    (case-insensitive), or a glob with ``*``, ``?`` or ``[...]`` (``qwen3*``
    matches qwen3, qwen3_moe and Qwen3RotaryEmbedding). The one matching
    rule of ROPE_PATCH_EXCLUDE, ``patch(exclude=...)`` and ``rope-patch list``."""
    wanted = pattern.lower()
    names = (model_type.lower(), class_name.lower())
    if any(character in wanted for character in _GLOB_CHARACTERS):
        return any(fnmatch.fnmatchcase(name, wanted) for name in names)
    return wanted in names


def parse_flag(name: str, value: str) -> bool:
    """Parse a boolean variable; raise SettingsError naming ``name``."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean (use 1 or 0)")


def parse_names(name: str, value: str | Iterable[str]) -> frozenset[str]:
    """Parse a comma list of model types / class names (case-insensitive)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if not item.translate(_NAME_PUNCTUATION).isalnum() and item.strip(_GLOB_CHARACTERS + "]"):
            raise SettingsError(f"{name}: {item!r} is not a model type, class name or glob")
        names.add(item.lower())
    return frozenset(names)


def parse_positive_int(name: str, value: str) -> int:
    """Parse a positive integer variable; raise SettingsError naming ``name``."""
    try:
        number = int(value.strip())
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not an integer") from None
    if number <= 0:
        raise SettingsError(f"{name}={value!r} must be positive")
    return number


def parse_verbosity(name: str, value: str) -> str:
    """Parse a verbosity (a rope_patch.logs level name, any case); raise
    SettingsError naming ``name``."""
    level = value.strip().lower() or logs.DEFAULT
    if level not in logs.LEVELS:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(logs.LEVELS)}")
    return level


def from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the ROPE_PATCH_* variables.

    Args:
        environ: the mapping to read (default ``os.environ``).

    Returns:
        The settings. An unparseable value is logged as a warning naming the
        variable and gives the safe choice: ``Settings(disabled=True)``.
    """
    env = os.environ if environ is None else environ
    try:
        return Settings(
            disabled=parse_flag(DISABLE, env.get(DISABLE, "")),
            exclude=parse_names(EXCLUDE, env.get(EXCLUDE, "")),
            sync_free=parse_flag(SYNC_FREE, env.get(SYNC_FREE, "")),
            max_positions=(
                parse_positive_int(MAX_POSITIONS, env[MAX_POSITIONS]) if env.get(MAX_POSITIONS, "").strip() else None
            ),
            verbosity=parse_verbosity(VERBOSITY, env.get(VERBOSITY, "")),
        )
    except SettingsError as error:
        logger.warning("rope_patch: %s; patching nothing", error)
        return Settings(disabled=True, problem=str(error))
