"""Per-module state: what rope_patch keeps for each rotary instance, outside
the module, and the class-wide records that ``status()`` and ``cache_info``
report.

Nothing is stored on the module: state lives in :data:`states` keyed by
``id(module)`` and is dropped when the module is garbage collected, so
``state_dict``, pickling and deepcopy never see it. The fast path reads
:data:`states` directly; the slow paths (rope_patch.cache.engine, and
rope_patch.cache.rebuild.slow for cache rebuilds) find, change and drop a
module's tables through the functions here.

Public: :class:`ModuleState`, :data:`states`, :func:`state_of`,
:func:`state_for`, :func:`forget_all`, :func:`max_position_embeddings`,
:func:`disable`, :func:`hand_over`, :func:`observe_handed`,
:func:`mark_answered`, :func:`current_table`, :func:`drop_stale`,
:func:`cap`, :data:`SEQ_LEN_READ`, and the class-wide records
(:data:`observed_fallbacks`, :data:`observed_handed`,
:data:`answered_classes`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

from rope_patch import settings as settings_module
from rope_patch.cache import bounds, shared
from rope_patch.cache.numerics import mark_forked_child

logger = logging.getLogger("rope_patch.cache")


class ModuleState:
    """What rope_patch keeps for one module instance, outside the module.

    Attributes:
        tables: (device, dtype, key arguments) -> the Table that answers.
        spares: (device, dtype, key arguments) -> a table of the rope type's
            other frequency state (longrope's other set), kept to switch back.
        never: layer_type -> why it is always computed unpatched (a rope
            type whose frequencies change in a way tables cannot follow).
        parked: layer_type -> the Family of a rope type whose current
            state no table holds (dynamic NTK while scaled): calls go
            straight to the unpatched forward while that lasts.
        fallback: why this module is never cached, or None.
        answer: the compiled answer (rope_patch.cache.fast) of the table
            that last answered a call without a layer type, tried first by
            the fast path; None when there is none. Each checks the whole
            rule itself, so an outdated one only refuses; they are dropped
            whenever tables change so that none keeps a dropped table alive.
        answers: layer type -> the same, for forwards keyed by one.
        handed: why calls of it were computed unpatched for a reason of its
            class, each once, in the order seen (:func:`hand_over`).
        cap: the largest table size in positions.
        capped: why ``cap`` was lowered below the configured one (a build
            failed past it), or None.
        presize: sync-free mode: the size tables are built at.
        lock: held while tables are built or changed.
    """

    __slots__ = (
        "answer",
        "answers",
        "cap",
        "capped",
        "fallback",
        "handed",
        "lock",
        "never",
        "parked",
        "presize",
        "spares",
        "tables",
    )

    def __init__(self, module, settings: settings_module.Settings):
        self.tables: dict = {}
        #: key -> a table of another frequency state (longrope's other set)
        self.spares: dict = {}
        self.never: dict = {}
        self.parked: dict = {}
        self.fallback: str | None = None
        self.answer = None
        self.answers: dict = {}
        self.handed: dict[str, None] = {}
        max_positions = max_position_embeddings(module)
        self.cap = settings.max_positions or max(max_positions or 0, settings_module.DEFAULT_MIN_CAP)
        self.presize = min(max_positions or self.cap, self.cap) if settings.sync_free else None
        self.capped: str | None = None
        self.lock = threading.RLock()

    def forget_answers(self) -> None:
        """Drop the compiled answers (tables changed, or the module falls back)."""
        self.answer = None
        self.answers = {}


#: id(module) -> its state; read by the fast path directly.
states: dict[int, ModuleState] = {}
_states_lock = threading.Lock()
_warned: set[type] = set()
#: class -> reason, for classes that fell back at run time (``status()``).
observed_fallbacks: dict[type, str] = {}
#: class -> why calls of it went to the unpatched forward for a reason of
#: the class (each reason once, in the order seen): a class with no call
#: answered from a table is reported with them (``status()``).
observed_handed: dict[type, dict[str, None]] = {}
#: classes some call of which was answered from a verified table.
answered_classes: set[type] = set()

#: Why a call passing ``seq_len`` to ``forward(x, position_ids, seq_len=None)``
#: goes to the unpatched forward (Phi-3-era remote code passes it on every
#: call; a forward that provably never reads it is answered anyway).
SEQ_LEN_READ = "calls passing seq_len are computed unpatched: this forward reads it (tables answer calls without it)"


def state_of(module) -> ModuleState | None:
    """The state of ``module`` if it has run a patched forward."""
    return states.get(id(module))


def state_for(module) -> ModuleState:
    """The state of ``module``, created on first use."""
    key = id(module)
    state = states.get(key)
    if state is None:
        with _states_lock:
            state = states.get(key)
            if state is None:
                state = states[key] = ModuleState(module, settings_module.active or settings_module.Settings())
                # The module owns its tables: drop them when it is collected.
                weakref.finalize(module, states.pop, key, None)
    return state


def forget_all() -> None:
    """Drop every table and fallback record (used by ``unpatch``): after a
    new ``patch()`` modules rebuild, and decide again, on next use."""
    with _states_lock:
        for state in states.values():
            with state.lock:
                state.tables.clear()
                state.spares.clear()
                state.never.clear()
                state.parked.clear()
                state.handed.clear()
                state.fallback = None
                state.forget_answers()
        observed_fallbacks.clear()
        observed_handed.clear()
        answered_classes.clear()
    bounds.forget()
    shared.forget()


def _after_fork_in_child() -> None:
    """A fork while another thread held a lock (building a table) would
    leave the child's copy held forever: give the child fresh locks, and
    build its tables on one thread (see numerics.mark_forked_child)."""
    global _states_lock
    _states_lock = threading.Lock()
    for state in states.values():
        state.lock = threading.RLock()
    mark_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def max_position_embeddings(module) -> int | None:
    """The module's configured maximum position, when it says."""
    config = getattr(module, "config", None)
    for source, name in (
        (config, "max_position_embeddings"),
        (module, "original_max_seq_len"),
        (module, "max_positions"),
        (module, "max_position_embeddings"),  # remote code's rotaries keep their own (DeepSeek-V3: 163840)
    ):
        value = getattr(source, name, None) if source is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def disable(module, state: ModuleState, reason: str, *, mismatch: bool = False) -> None:
    """Stop caching ``module`` for good; say so once per class.

    Args:
        mismatch: a table disagreed with the unpatched forward on a real
            call (a rope_patch bug the user should report: a warning). Every
            other reason is a decision by design (logged at INFO: vision
            rotaries, nothing to gain, forwards no table can follow).
    """
    state.fallback = reason
    state.forget_answers()
    state.tables.clear()
    state.spares.clear()
    cls = type(module)
    observed_fallbacks.setdefault(cls, reason)
    if cls not in _warned:
        _warned.add(cls)
        level = logging.WARNING if mismatch else logging.INFO
        logger.log(level, "rope_patch: %s is computed unpatched from now on: %s", cls.__name__, reason)


def hand_over(module, reason: str) -> None:
    """Record that a call of ``module`` goes to the unpatched forward for a
    reason of its class (``status()`` and ``cache_info`` report it); once
    per module and reason. Called only on paths that run the original."""
    state = state_for(module)
    if reason in state.handed:
        return
    with state.lock:
        state.handed[reason] = None
    observe_handed(type(module), reason)


def observe_handed(cls: type, reason: str) -> None:
    """The class-wide record of a hand-over reason (status()), said once at INFO."""
    reasons = observed_handed.setdefault(cls, {})
    if reason not in reasons:
        reasons[reason] = None
        logger.info("rope_patch: %s: %s", cls.__name__, reason)


def mark_answered(module) -> None:
    """A call of ``module`` was answered from a verified table."""
    answered_classes.add(type(module))


def current_table(state: ModuleState, key):
    """The table for ``key`` whose frequency state is the module's now:
    unchanged, or changed to equal values (then re-armed); the spare (the
    other longrope set) becomes current when it is the one that matches.
    None when neither matches."""
    table = state.tables.get(key)
    for candidate in (table, state.spares.get(key)):
        if candidate is None:
            continue
        if not candidate.watch.holds(grad=False):
            rearmed = candidate.watch.rearmed()
            if rearmed is None:
                continue
            candidate.watch = rearmed
        if candidate is not table:
            state.spares[key], state.tables[key] = table, candidate
            state.forget_answers()
        return candidate
    return None


def drop_stale(state: ModuleState, keep) -> None:
    """Forget tables built from frequency state the module no longer has
    (after ``.to(dtype)`` or a device move), so they do not pin memory; the
    spare of ``keep`` (the call's key) stays."""
    for tables in (state.tables, state.spares):
        for key, table in list(tables.items()):
            if tables is state.spares and key == keep:
                continue
            if table is None or (not table.watch.holds(grad=False) and table.watch.rearmed() is None):
                del tables[key]
                state.forget_answers()


def cap(state: ModuleState, size: int, problem) -> None:
    """Tables of ``state`` stop at ``size`` positions: a build past it failed
    with ``problem``; calls reaching past it are computed unpatched, and say so."""
    state.cap = size
    state.capped = f"calls reaching position {size} or beyond are computed unpatched: {problem}"
