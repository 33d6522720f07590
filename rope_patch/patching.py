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
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, ClassVar

import wrapt

from rope_patch import discovery, logs, versions
from rope_patch import settings as settings_module
from rope_patch.status import ClassStatus, Status, classify

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_MISSING = object()


class _Registry:
    """Process-wide patch state, guarded by ``lock``. The settings in effect
    are ``rope_patch.settings.active`` (None: not patched)."""

    lock: ClassVar[threading.RLock] = threading.RLock()
    #: (class, attribute) -> (its ``__dict__[attribute]`` before we touched
    #: it or _MISSING, the function we installed): ``forward``, and the
    #: cache rebuild of classes that have one (rope_patch.cache.rebuild)
    installed: ClassVar[dict[tuple[type, str], tuple[object, object]]] = {}
    #: class -> ClassStatus, for every class a hook has seen while patched
    seen: ClassVar[dict[type, ClassStatus]] = {}
    #: module names with a wrapt hook registered (hooks cannot be removed)
    hooked: ClassVar[set[str]] = set()
    #: remote-code modules (``transformers_modules.*``) scanned while patched
    remote_scanned: ClassVar[weakref.WeakSet] = weakref.WeakSet()


def _fresh_lock_in_child() -> None:
    """A fork while another thread patched would leave the child's lock held."""
    _Registry.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)


def is_patched() -> bool:
    """Whether ``patch()`` is in effect."""
    return settings_module.active is not None


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
        settings = settings_module.from_environment()
        logs.configure(settings.verbosity)
        problem = versions.problem()
        if problem is not None:
            _warn_once(f"rope_patch: {problem}; nothing is patched")
            return False
        if settings.disabled:
            logger.info("rope_patch: disabled by the environment; nothing is patched")
            return False
        if exclude is not None:
            settings = settings.replace(exclude=settings.exclude | settings_module.parse_names("exclude", exclude))
        if sync_free is not None:
            settings = settings.replace(sync_free=bool(sync_free))
        if max_positions is not None:
            settings = settings.replace(max_positions=int(max_positions))
        settings_module.active = settings
        names = discovery.modeling_module_names()
    for name in names:
        module = sys.modules.get(name)
        if module is not None:
            _on_import(module)
        elif name not in _Registry.hooked:
            _Registry.hooked.add(name)
            wrapt.register_post_import_hook(_on_import, name)
    # Remote code (trust_remote_code=True): transformers loads it as
    # transformers_modules.* through dynamic_module_utils.get_class_in_module.
    _scan_remote_modules()
    if _REMOTE_LOADER not in _Registry.hooked:
        _Registry.hooked.add(_REMOTE_LOADER)
        wrapt.register_post_import_hook(_hook_remote_code, _REMOTE_LOADER)
    return True


_REMOTE_LOADER = "transformers.dynamic_module_utils"


def _hook_remote_code(loader_module) -> None:
    """wrapt post-import hook on transformers.dynamic_module_utils: patch
    the rotary classes of every remote-code module it loads (when patched).
    Never raises."""
    try:
        wrapt.wrap_function_wrapper(loader_module, "get_class_in_module", _after_remote_class_loaded)
    except Exception:
        logger.debug("rope_patch: cannot hook remote code loading", exc_info=True)


def _after_remote_class_loaded(wrapped, instance, args, kwargs):
    cls = wrapped(*args, **kwargs)
    if settings_module.active is not None:
        _scan_remote_modules()
    return cls


def _scan_remote_modules() -> None:
    """Patch the rotary classes of every remote-code module imported and not
    scanned yet: the module ``get_class_in_module`` returned, and the
    sibling modules it imported while it ran (an InternVL2-style
    ``modeling_internvl_chat`` imports ``.modeling_internlm2``, whose rotary
    the returned class never names). Module objects are remembered, so a
    scan costs one pass over ``sys.modules``; a reloaded module is a new
    object and is scanned again. Never raises (``_on_import`` logs)."""
    prefix = discovery.REMOTE_PACKAGE + "."
    with _Registry.lock:
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith(prefix):
                continue
            try:
                if module in _Registry.remote_scanned:
                    continue
                _Registry.remote_scanned.add(module)
            except TypeError:  # unhashable or not weak-referenceable (a stand-in in sys.modules): scan each time
                pass
            _on_import(module)


def unpatch() -> bool:
    """Restore every forward to its original function object. A wrapt
    wrapper applied on top of rope_patch's forward stays, with the original
    put back beneath it.

    Returns:
        True if something was unpatched; False (with a warning) if not patched.
    """
    with _Registry.lock:
        if not is_patched():
            logger.warning("rope_patch: not patched; unpatch() ignored")
            return False
        for (cls, name), (previous, ours) in _Registry.installed.items():
            _uninstall(cls, previous, ours, name)
        _Registry.installed.clear()
        _Registry.seen.clear()
        _Registry.remote_scanned.clear()
        settings_module.active = None
        if "rope_patch.cache" in sys.modules:  # else no table was ever built
            sys.modules["rope_patch.cache"].forget_all()
    return True


def _uninstall(cls: type, previous, ours, name: str = "forward") -> None:
    """Put ``previous`` back as ``cls.<name>``; when another wrapper was
    applied on top of ``ours`` since, rewire it onto the original instead."""
    from rope_patch import marks

    current = cls.__dict__.get(name, _MISSING)
    if current is ours or current is _MISSING:
        if previous is _MISSING:
            if current is not _MISSING:
                delattr(cls, name)
        else:
            setattr(cls, name, previous)
        return
    link = current
    for _ in range(8):  # find the wrapper whose __wrapped__ is ours
        inner = getattr(link, "__wrapped__", None)
        if inner is None:
            break
        if inner is ours:
            try:
                link.__wrapped__ = marks.original_of(ours)
                return
            except (AttributeError, TypeError):
                break
        link = inner
    # A wrapper we cannot rewire (a plain decorator) keeps calling ours:
    # retired, ours now runs the original on every call.
    marks.retire(ours)
    logger.info(
        "rope_patch: %s.%s was wrapped after rope_patch by something that cannot be rewired; "
        "it stays, and calls the original through rope_patch's retired replacement",
        cls.__name__,
        name,
    )


@contextlib.contextmanager
def disabled():
    """Within this block, in this thread, every rotary forward runs unpatched."""
    from rope_patch.cache import rule  # imports torch: only when used

    with rule.disabled():
        yield


def status() -> list[ClassStatus]:
    """What patching did with every class seen so far, run-time fallbacks included."""
    with _Registry.lock:
        rows = list(_Registry.seen.values())
    cache = sys.modules.get("rope_patch.cache")
    fallbacks = cache.fallback_reasons() if cache is not None else {}
    # A class none of whose calls was answered, every one handed to the
    # original for a reason of the class, is a fallback with that reason.
    handed = cache.handed_reasons([row.rotary.cls for row in rows]) if cache is not None else {}
    out = []
    for row in rows:
        reason = fallbacks.get(row.rotary.cls) or handed.get(row.rotary.cls)
        # the condition inline, where mypy sees that reason is not None
        out.append(
            dataclasses.replace(row, status=Status.FALLBACK, reason=reason)
            if reason and row.status == Status.CACHED
            else row
        )
    return sorted(out, key=lambda r: (r.rotary.module, r.rotary.name))


def patch_class(cls: type[torch.nn.Module]) -> ClassStatus:
    """Patch one rotary class that patching does not find by itself (a
    subclass defined by your code, a model loaded from elsewhere), under the
    settings in effect. Idempotent.

    Args:
        cls: an ``nn.Module`` subclass with a rotary forward.

    Returns:
        What patching does with it.

    Raises:
        RuntimeError: patching is not active (call ``patch()`` first).
    """
    with _Registry.lock:
        settings = settings_module.active
        if settings is None:
            raise RuntimeError("rope_patch is not patched: call rope_patch.patch() first")
        _apply(discovery.describe(cls), settings)
        return _Registry.seen[cls]


def _on_import(module) -> None:
    """wrapt post-import hook: wrap the module's rotary classes.

    Never raises: an exception here would fail the user's import.
    """
    try:
        with _Registry.lock:
            settings = settings_module.active
            if settings is None:
                return
            for rotary in discovery.rotary_classes(module):
                _apply(rotary, settings)
    except Exception:
        logger.warning(
            "rope_patch: could not patch %s; left unpatched", getattr(module, "__name__", module), exc_info=True
        )


def _apply(rotary: discovery.RotaryClass, settings: settings_module.Settings) -> None:
    """Make the forward that ``rotary.cls`` resolves to match its status."""
    from rope_patch import forward  # torch is imported by now: the class is a Module
    from rope_patch.marks import original_of

    cls = rotary.cls
    if cls in _Registry.seen:
        return
    decision = classify(rotary, settings)
    resolved = getattr(cls, "forward", None)
    original = original_of(resolved) or resolved
    if decision.status == Status.CACHED and rotary.rebuild is not None:
        # Its own cache rebuild is answered; its forward is left as it is
        # (rope_patch.cache.rebuild).
        _install_rebuild(cls, rotary.rebuild)
    if decision.status == Status.CACHED and rotary.rebuild is None:
        if original_of(resolved) is None:
            # Own forward, or an inherited one nobody wrapped: wrap it here.
            _install(cls, forward.make_forward(original, rotary))
    elif original_of(resolved) is not None:
        # A forward that must stay the original (excluded, unsupported, or a
        # rebuild class) but is inherited wrapped: pin the original.
        _install(cls, original)
    _Registry.seen[cls] = decision
    if decision.status != Status.CACHED:
        logger.info("rope_patch: %s is left unpatched (%s): %s", cls.__name__, decision.status, decision.reason)


def _install_rebuild(cls: type, name: str) -> None:
    """Replace the cache rebuild ``cls.<name>`` (rope_patch.rebuild_method),
    own or inherited from a class nobody patched, like a forward."""
    from rope_patch.marks import original_of
    from rope_patch.rebuild_method import make_method

    resolved = getattr(cls, name)
    if original_of(resolved) is None:
        _install(cls, make_method(resolved), name)


def _install(cls: type, function, name: str = "forward") -> None:
    previous = _Registry.installed.get((cls, name), (cls.__dict__.get(name, _MISSING), None))[0]
    _Registry.installed[(cls, name)] = (previous, function)
    setattr(cls, name, function)


_warned_messages: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned_messages:
        _warned_messages.add(message)
        logger.warning("%s", message)
