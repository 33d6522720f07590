"""Installing and removing the replacement forwards.

``patch()`` registers a wrapt post-import hook for every modeling module
(listed from the filesystem, so nothing is imported early); the hook wraps the
rotary classes of the module as it is imported, or at once for modules that
are already imported. ``unpatch()`` puts back the exact function objects.
Every decision about a class comes from :func:`classify`, which the CLI uses
too, so what ``rope-patch list`` reports is what the runtime does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading

import wrapt

from rope_patch import discovery, versions
from rope_patch import settings as settings_module

logger = logging.getLogger(__name__)

CACHED = "cached"
FALLBACK = "fallback"
EXCLUDED = "excluded"
UNSUPPORTED = "unsupported"

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class ClassStatus:
    """What rope_patch does with one rotary class.

    Attributes:
        rotary: the class and its static description.
        status: CACHED, FALLBACK, EXCLUDED or UNSUPPORTED.
        reason: a short human explanation ("" for plain cached classes).
    """

    rotary: discovery.RotaryClass
    status: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The ``rope-patch list --json`` row."""
        return {
            "model_type": self.rotary.model_type,
            "module": self.rotary.module,
            "class": self.rotary.name,
            "status": self.status,
            "reason": self.reason,
        }


def classify(rotary: discovery.RotaryClass, settings: settings_module.Settings) -> ClassStatus:
    """Decide, statically, what patching does with ``rotary`` under ``settings``.

    A class classified CACHED can still fall back at run time (probe mismatch,
    a dynamic rope type in the instance's config); :func:`status` reports that.
    """
    if settings.disabled:
        why = settings.problem or f"{settings_module.DISABLE} is set"
        return ClassStatus(rotary, EXCLUDED, why)
    if settings.excludes(rotary.model_type, rotary.name):
        return ClassStatus(rotary, EXCLUDED, f"excluded by {settings_module.EXCLUDE} or patch(exclude=...)")
    if rotary.unsupported:
        return ClassStatus(rotary, UNSUPPORTED, rotary.unsupported)
    return ClassStatus(rotary, CACHED, "")


class _Registry:
    """Process-wide patch state, guarded by ``lock``."""

    lock = threading.RLock()
    settings: settings_module.Settings | None = None  # None: not patched
    #: class -> its ``__dict__["forward"]`` before we touched it (_MISSING if none)
    installed: dict[type, object] = {}
    #: class -> ClassStatus, for every class a hook has seen while patched
    seen: dict[type, ClassStatus] = {}
    #: module names with a wrapt hook registered (hooks cannot be removed)
    hooked: set[str] = set()


def is_patched() -> bool:
    """Whether ``patch()`` is in effect."""
    return _Registry.settings is not None


def patch(
    exclude: str | list[str] | None = None,
    *,
    sync_free: bool | None = None,
    max_positions: int | None = None,
) -> bool:
    """Wrap every rotary class, now and as modeling modules get imported.

    Args:
        exclude: model types or class names (case-insensitive; ``"*"`` for
            all) to leave untouched, in addition to ROPE_PATCH_EXCLUDE.
        sync_free: override ROPE_PATCH_SYNC_FREE (accelerators only: pre-size
            tables to max_position_embeddings and skip the bound check).
        max_positions: override ROPE_PATCH_MAX_POSITIONS.

    Returns:
        True if patching is now active; False when already patched (a no-op,
        with a warning), disabled by the environment, or unsupported versions.
    """
    with _Registry.lock:
        if is_patched():
            logger.warning("rope_patch: already patched; patch() ignored")
            return False
        problem = versions.problem()
        if problem is not None:
            _warn_once(f"rope_patch: {problem}; nothing is patched")
            return False
        settings = settings_module.from_environment()
        if settings.disabled:
            logger.info("rope_patch: disabled by the environment; nothing is patched")
            return False
        if exclude is not None:
            settings = settings.replace(
                exclude=settings.exclude | settings_module.parse_names("exclude", exclude)
            )
        if sync_free is not None:
            settings = settings.replace(sync_free=bool(sync_free))
        if max_positions is not None:
            settings = settings.replace(max_positions=int(max_positions))
        _Registry.settings = settings_module.active = settings
        names = discovery.modeling_module_names()
    for name in names:
        module = sys.modules.get(name)
        if module is not None:
            _on_import(module)
        elif name not in _Registry.hooked:
            _Registry.hooked.add(name)
            wrapt.register_post_import_hook(_on_import, name)
    return True


def unpatch() -> bool:
    """Restore every forward to its original function object.

    Returns:
        True if something was unpatched; False (with a warning) if not patched.
    """
    with _Registry.lock:
        if not is_patched():
            logger.warning("rope_patch: not patched; unpatch() ignored")
            return False
        for cls, previous in _Registry.installed.items():
            if previous is _MISSING:
                delattr(cls, "forward")
            else:
                setattr(cls, "forward", previous)
        _Registry.installed.clear()
        _Registry.seen.clear()
        _Registry.settings = settings_module.active = None
        if "rope_patch.tables" in sys.modules:  # else no table was ever built
            sys.modules["rope_patch.tables"].forget_all()
    return True


@contextlib.contextmanager
def disabled():
    """Within this block, in this thread, every rotary forward runs unpatched."""
    from rope_patch import forward  # imports torch: only when used

    forward.local.disabled += 1
    try:
        yield
    finally:
        forward.local.disabled -= 1


def status() -> list[ClassStatus]:
    """What patching did with every class seen so far, run-time fallbacks included."""
    with _Registry.lock:
        rows = list(_Registry.seen.values())
    fallbacks = sys.modules["rope_patch.tables"].observed_fallbacks if "rope_patch.tables" in sys.modules else {}
    out = []
    for row in rows:
        reason = fallbacks.get(row.rotary.cls)
        out.append(dataclasses.replace(row, status=FALLBACK, reason=reason) if reason and row.status == CACHED else row)
    return sorted(out, key=lambda r: (r.rotary.module, r.rotary.name))


def _on_import(module) -> None:
    """wrapt post-import hook: wrap the module's rotary classes.

    Never raises: an exception here would fail the user's import.
    """
    try:
        with _Registry.lock:
            settings = _Registry.settings
            if settings is None:
                return
            for rotary in discovery.rotary_classes(module):
                _apply(rotary, settings)
    except Exception:  # noqa: BLE001
        logger.warning("rope_patch: could not patch %s; left unpatched", getattr(module, "__name__", module), exc_info=True)


def _apply(rotary: discovery.RotaryClass, settings: settings_module.Settings) -> None:
    """Make the forward that ``rotary.cls`` resolves to match its status."""
    from rope_patch import forward  # torch is imported by now: the class is a Module

    cls = rotary.cls
    if cls in _Registry.seen:
        return
    decision = classify(rotary, settings)
    resolved = getattr(cls, "forward", None)
    original = forward.original_of(resolved) or resolved
    if decision.status == CACHED:
        if forward.original_of(resolved) is None:
            # Own forward, or an inherited one nobody wrapped: wrap it here.
            _install(cls, forward.make_forward(original, rotary.takes_layer_type))
    elif forward.original_of(resolved) is not None:
        # Excluded or unsupported, but inheriting a wrapped forward: pin the
        # original so this class stays untouched.
        _install(cls, original)
    _Registry.seen[cls] = decision


def _install(cls: type, function) -> None:
    _Registry.installed.setdefault(cls, cls.__dict__.get("forward", _MISSING))
    setattr(cls, "forward", function)


_warned_messages: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned_messages:
        _warned_messages.add(message)
        logger.warning("%s", message)
