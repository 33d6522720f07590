"""What rope_patch does with a rotary class or module, in one vocabulary.

- :class:`Status`: cached, fallback, excluded, unsupported.
- :func:`classify`: the static decision for a class under given settings
  (what patching installs; the CLI reports the same).
- :func:`outcome`: what the runtime did with one module instance (its
  tables, or why it computes unpatched), read from
  :func:`rope_patch.cache_info`.
"""

from __future__ import annotations

import dataclasses
import enum

from rope_patch import discovery
from rope_patch import settings as settings_module


class Status(str, enum.Enum):
    """What rope_patch does with a class (a str: ``Status.CACHED == "cached"``)."""

    #: Wrapped; calls are answered from tables.
    CACHED = "cached"
    #: Wrapped, but computed by the unpatched forward (the reason says why).
    FALLBACK = "fallback"
    #: Left alone by configuration (ROPE_PATCH_EXCLUDE, ROPE_PATCH_DISABLE, patch(exclude=...)).
    EXCLUDED = "excluded"
    #: Left alone: its forward has no form a table can answer.
    UNSUPPORTED = "unsupported"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class ClassStatus:
    """What rope_patch does with one rotary class.

    Attributes:
        rotary: the class and its static description.
        status: a Status.
        reason: a short human explanation ("" for plain cached classes).
    """

    rotary: discovery.RotaryClass
    status: Status
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The ``rope-patch list --json`` row."""
        return {
            "model_type": self.rotary.model_type,
            "module": self.rotary.module,
            "class": self.rotary.name,
            "status": str(self.status),
            "reason": self.reason,
        }


def classify(rotary: discovery.RotaryClass, settings: settings_module.Settings) -> ClassStatus:
    """Decide, statically, what patching does with ``rotary`` under ``settings``.

    A class classified CACHED can still fall back at run time (probe mismatch,
    a rope type or read the tables cannot follow); :func:`outcome` and
    ``rope_patch.status()`` report that.
    """
    if settings.disabled:
        why = settings.problem or f"{settings_module.DISABLE} is set"
        return ClassStatus(rotary, Status.EXCLUDED, why)
    if settings.excludes(rotary.model_type, rotary.name):
        return ClassStatus(rotary, Status.EXCLUDED, f"excluded by {settings_module.EXCLUDE} or patch(exclude=...)")
    if rotary.unsupported:
        return ClassStatus(rotary, Status.UNSUPPORTED, rotary.unsupported)
    return ClassStatus(rotary, Status.CACHED, "")


#: The form name of multimodal (M-RoPE) calls answered from tables.
MROPE = "M-RoPE"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the runtime did with one module instance.

    Attributes:
        status: CACHED (some call was answered from a verified table) or FALLBACK.
        reason: why FALLBACK ("" when cached).
        forms: the position layouts answered from tables ("2-D", "3-D",
            "M-RoPE"; see rope_patch.TableInfo).
    """

    status: Status
    reason: str
    forms: frozenset[str] = frozenset()

    @property
    def mrope(self) -> bool:
        """Multimodal (M-RoPE) calls are answered from tables."""
        return MROPE in self.forms


def outcome(module) -> Outcome:
    """What the runtime did with ``module`` so far (patching active)."""
    from rope_patch.cache import cache_info  # imports torch: only when asked

    info = cache_info(module)
    if info.fallback is not None:
        return Outcome(Status.FALLBACK, info.fallback)
    forms = frozenset(form for table in info.tables for form in table.forms)
    if forms:
        return Outcome(Status.CACHED, "", forms)
    if info.unpatched:
        return Outcome(Status.FALLBACK, "; ".join(info.unpatched))
    if info.tables:
        return Outcome(Status.FALLBACK, "no call was answered from its tables")
    return Outcome(Status.FALLBACK, "no call reached a table (a rope type computed per call, or every call raised)")
