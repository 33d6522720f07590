"""The slow path and the per-module state: everything that is not a plain
table hit.

A call that the fast path (rope_patch.forward) could not answer comes here
(:func:`call`): the table for its (device, dtype, key arguments) is found
(its frequency state re-armed by value if the objects changed), built or
grown, the form for the call's layout of position_ids is learnt, the first
real call of each form is compared with the unpatched forward, and the
answer comes from the table only if :func:`rope_patch.cache.rule.answering_form`
says so. Everything else is computed by the unpatched forward: same result,
or same exception.

Nothing is stored on the module: state lives in ``_states`` keyed by
``id(module)`` and is dropped when the module is garbage collected, so
``state_dict``, pickling and deepcopy never see it.

Public (read by the replacement forward and by the rebuild slow path,
rope_patch.cache.rebuild.slow): :class:`ModuleState`, :data:`states`,
:func:`state_of`, :func:`state_for`, :func:`forget_all`, :func:`call`,
:func:`hand_over`, :func:`mark_answered`, :func:`current_table`,
:func:`drop_stale`, :func:`disable`, :func:`largest_table`, :func:`cap`,
:func:`max_position_embeddings`, :data:`SEQ_LEN_READ` and the class-wide
records (``observed_fallbacks``, ``observed_handed``, ``answered_classes``).
The engine imports nothing above it: the vision reason comes from
rope_patch.vision, not from discovery.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import cast

from rope_patch import settings as settings_module
from rope_patch.cache import bounds, rule, shared
from rope_patch.cache.build import StateChanged, build_table, table_from
from rope_patch.cache.families import family_for
from rope_patch.cache.forms import PlanarForm, PrefixForm
from rope_patch.cache.forms import axes as axes_form
from rope_patch.cache.numerics import exact_numerics, mark_forked_child
from rope_patch.cache.table import NotCacheable, NotPerPosition, table_size
from rope_patch.identity import difference
from rope_patch.vision import VISION_REASON, is_vision

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


def _log_table(module, key, table) -> None:
    device, dtype, layer_type = key
    logger.info(
        "rope_patch: %s: table built on %s for %s%s: positions 0..%d, %d bytes%s",
        type(module).__name__,
        device,
        str(dtype).replace("torch.", ""),
        "" if layer_type is None else f", layer_type {layer_type}",
        table.size - 1,
        table.nbytes(),
        "" if table.shared is None else " (columns shared with modules of equal frequency state)",
    )


def hand_over(module, reason: str) -> None:
    """Record that a call of ``module`` goes to the unpatched forward for a
    reason of its class (``status()`` and ``cache_info`` report it); once
    per module and reason. Called only on paths that run the original."""
    state = state_for(module)
    if reason in state.handed:
        return
    with state.lock:
        state.handed[reason] = None
    _observe_handed(type(module), reason)


def _observe_handed(cls: type, reason: str) -> None:
    """The class-wide record of a hand-over reason (status()), said once at INFO."""
    reasons = observed_handed.setdefault(cls, {})
    if reason not in reasons:
        reasons[reason] = None
        logger.info("rope_patch: %s: %s", cls.__name__, reason)


def mark_answered(module) -> None:
    """A call of ``module`` was answered from a verified table."""
    answered_classes.add(type(module))


# --------------------------------------------------------------------------
# The slow path


def call(module, original, x, position_ids, layer_type, extra: tuple):
    """Answer a call the fast path could not. Same result, or same
    exception, as ``original(module, x, position_ids, *extra)``.

    Args:
        original: the class's own forward.
        layer_type: the key argument (None for forwards without one).
        extra: the arguments after position_ids, as the call passed them.
    """
    state = states.get(id(module))
    if state is not None and (state.never or state.parked):  # the unpatched forward, at once
        if layer_type in state.never:
            return original(module, x, position_ids, *extra)
        family = state.parked.get(layer_type)
        if family is not None and not family.cacheable(module, layer_type):
            return original(module, x, position_ids, *extra)  # still a state no table holds
    if not rule.answerable(x, position_ids):
        return original(module, x, position_ids, *extra)
    state = state or state_for(module)
    if state.fallback is not None:
        return original(module, x, position_ids, *extra)
    with state.lock:
        return _answer(state, module, original, x, position_ids, layer_type, extra)


class _Call:
    """One call on the slow path: the class's forward (what tables are built
    and probed from, and what computes the call unpatched) with the call's
    arguments, and how large its table may be."""

    __slots__ = ("extra", "forward", "limit", "module", "position_ids", "x")

    def __init__(self, module, x, position_ids, extra, forward):
        self.module, self.x, self.position_ids, self.extra = module, x, position_ids, extra
        self.forward = forward
        #: the largest table size for this call, set by _answer before any table is adopted or built
        self.limit: int | None = None

    def compute(self):
        """The unpatched result of this call (for a changing rope type, after
        its update ran: the forward's own update then changes nothing)."""
        return self.forward(self.module, self.x, self.position_ids, *self.extra)


def _answer(state: ModuleState, module, original, x, position_ids, layer_type, extra: tuple):
    key = (x.device, x.dtype, layer_type)
    family = family_for(module, original, layer_type)
    if isinstance(family, str):  # a rope type we cannot follow
        state.never[layer_type] = family
        _observe_handed(type(module), family)
        return original(module, x, position_ids, *extra)
    call = _Call(module, x, position_ids, extra, original)
    if family is not None:
        if type(position_ids) is int or position_ids.dim() != 2:  # tables of changing rope types: 2-D calls only
            return call.compute()
        if not family.cacheable(module, layer_type):
            # A state no table holds (dynamic, scaled): the unpatched forward,
            # with its own update (which may bring the module back); until
            # then, later calls skip the slow path (``call``).
            state.parked[layer_type] = family
            return call.compute()
        state.parked.pop(layer_type, None)
        family.update(module, x, position_ids, *extra)  # transformers' own state update
        if not family.cacheable(module, layer_type):
            state.parked[layer_type] = family
            return call.compute()
    table = current_table(state, key)
    if table is not None and table.watch.needs_grad():
        return call.compute()  # autograd must see the unpatched graph
    if type(position_ids) is int:
        low, high = 0, position_ids - 1
    else:
        low, high = bounds.extent(position_ids, id(module), state)
    call.limit = family.limit(module, layer_type, high, state.cap) if family else state.cap
    if low < 0 or high >= call.limit:
        if state.capped is not None and high >= state.cap:
            hand_over(module, state.capped)
        return call.compute()
    if table is None or high >= table.size:
        other_state = state.tables.pop(key, None) if table is None else None
        drop_stale(state, key)
        new = _adopt(state, call, key, high + 1)
        if new is None:
            new = _build(state, call, high + 1, lambda: _adopt(state, call, key, high + 1))
            if new is None:
                return call.compute()
            if new.shared is None and (2 in new.forms or 0 in new.forms):  # offered to modules of equal state
                shared.publish(call.module, shared.FORWARD, key, new)
        if family is not None:
            new.top_from = family.top_from(module, layer_type, new.size)
            if other_state is not None and family.name == "longrope":
                state.spares[key] = other_state  # the other frequency set: kept for switching back
        state.tables[key] = table = new
        state.forget_answers()
        if logger.isEnabledFor(logging.INFO):
            _log_table(module, key, new)
    form = _form_for(state, call, table)
    if form is None:
        return call.compute()
    if not form.verified:
        return _verify_first_use(state, call, table, form)
    if rule.answering_form(table, x, position_ids, updated=True) is not form:
        return call.compute()
    try:
        return form.lookup(module, x, position_ids)
    except (IndexError, RuntimeError):
        return call.compute()


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


def _adopt(state: ModuleState, call: _Call, key, needed: int):
    """A table answering from the columns of another module of the class
    whose frequency state is equal (per-layer rotaries), probed against this
    module's forward; or None (rope_patch.cache.shared)."""
    prefix = type(call.position_ids) is int
    form_class = PrefixForm if prefix else PlanarForm
    bound_check = call.x.device.type != "cpu" and state.presize is None

    def make(group, watch):
        return table_from(
            call.module, call.forward, call.x, call.extra, group.columns, group.container, group.size, watch,
            bound_check, form_class,
        )  # fmt: skip

    return shared.adopt(call.module, shared.FORWARD, key, needed, cast(int, call.limit), make)


def _build(state: ModuleState, call: _Call, needed: int, adopt=None):
    """A new table covering ``needed`` positions, or None (computed
    unpatched). Raises what the unpatched call raises when a failed build
    turns out to be the call's own fault.

    Args:
        adopt: tried again after the call ran (it may have initialised the
            module's state to that of a shared table; see :func:`_adopt`).
    """
    x = call.x
    bound_check = x.device.type != "cpu" and state.presize is None
    prefix = type(call.position_ids) is int
    axes = call.position_ids.shape[0] if not prefix and call.position_ids.dim() == 3 else 0

    def attempt(size):
        try:
            return build_table(call.module, call.forward, x, call.extra, size, bound_check, prefix=prefix)
        except NotCacheable as planar_error:
            if not axes:
                raise
            try:  # forwards that accept only 3-D positions (transformers 4.x Qwen2-VL)
                return build_table(call.module, call.forward, x, call.extra, size, bound_check, axes=axes)
            except NotCacheable as error:
                raise NotCacheable(f"{planar_error}; from {axes}-axis positions: {error}") from error

    limit = cast(int, call.limit)  # set by _answer before building
    presize = min(state.presize, limit) if state.presize is not None else None
    size = table_size(needed, limit, presize)
    try:
        return attempt(size)
    except NotCacheable as error:
        problem: NotCacheable | str = error
    # If the call itself raises, that exception propagates and nothing is
    # disabled.
    call.compute()
    if isinstance(problem, StateChanged):
        # The call may have set state the forward initialises on its first
        # call (Phi-3's inv_freq starts as None): once more, as it is now.
        adopted = adopt() if adopt is not None else None
        if adopted is not None:
            return adopted
        try:
            return attempt(size)
        except NotCacheable as error:
            problem = error
    if isinstance(problem, StateChanged):
        # It changes its own state past some positions (dynamic NTK in its
        # own code, InternLM2.5): tables stop below them, the rest is
        # computed unpatched, with the reason.
        table, above = largest_table(attempt, size - 1)
        if table is not None:
            cap(state, table.size, above or problem)
            return table if table.size >= needed else None
        if isinstance(above, StateChanged):
            problem = f"the forward changes the module's own state on every call ({problem.names})"
        elif above is not None:  # fewer positions leave the state alone, but fail otherwise
            problem = f"{problem}; with fewer positions, {above}"
    elif size > needed:
        # A forward whose own range ends before the rounded-up size (a
        # fixed-size buffer it indexes) gets a table of exactly ``needed``
        # positions, and the cap stops there.
        try:
            table = attempt(needed)
        except NotCacheable as error:
            problem = error
        else:
            cap(state, needed, problem)
            return table
    vision = isinstance(problem, NotPerPosition) and is_vision(type(call.module))
    disable(call.module, state, VISION_REASON if vision else str(problem))
    return None


def largest_table(attempt, high: int):
    """``(table, problem)``: the table of the largest size in ``1 .. high``
    that ``attempt(size)`` builds, found by bisection (None if none), and
    the NotCacheable of the smallest size tried above it (None if none)."""
    low, best, above = 0, None, None
    while low < high:
        middle = (low + high + 1) // 2
        try:
            best = attempt(middle)
        except NotCacheable as error:
            high, above = middle - 1, error
        else:
            low = middle
    return best, above


def cap(state: ModuleState, size: int, problem) -> None:
    """Tables of ``state`` stop at ``size`` positions: a build past it failed
    with ``problem``; calls reaching past it are computed unpatched, and say so."""
    state.cap = size
    state.capped = f"calls reaching position {size} or beyond are computed unpatched: {problem}"


def _form_for(state: ModuleState, call: _Call, table):
    """The table's form for this call's layout, learnt on first need; None
    for a layout computed unpatched."""
    position_ids = call.position_ids
    if type(position_ids) is int:
        form = table.forms.get(0)
        return form if form is not None and position_ids <= table.size else None
    dims = position_ids.dim()
    if dims in table.forms:
        form = table.forms[dims]
        return form if form is not None and (not form.axes or form.axes == position_ids.shape[0]) else None
    if dims != 3:  # a table built from 3-axis positions: the forward takes no 2-D ones
        return None
    try:
        form = axes_form.learn(table, call.module, call.forward, call.extra, call.x, position_ids.shape[0])
    except NotCacheable as error:
        disable(call.module, state, f"position_ids with {position_ids.shape[0]} axes: {error}")
        return None
    table.forms[dims] = form
    return form


def _verify_first_use(state: ModuleState, call: _Call, table, form):
    """Compare the form with the unpatched forward on its first real call."""
    expected = call.compute()
    try:
        actual = form.lookup(call.module, call.x, call.position_ids)
    except Exception as error:  # noqa: BLE001 - any failure means "do not cache"
        disable(call.module, state, f"table lookup failed: {error!r}", mismatch=True)
        return expected
    problem = difference(expected, actual)
    if problem is not None:
        # Under TF32 or autocast the unpatched value may be rounded; the
        # table holds the exact one, which is what we promise there.
        with exact_numerics(call.x.device.type):
            exact = call.compute()
        if difference(exact, actual) is not None:
            disable(call.module, state, f"first call differs from the unpatched forward: {problem}", mismatch=True)
            return expected
    form.verified = True
    mark_answered(call.module)
    return actual if rule.answering_form(table, call.x, call.position_ids, updated=True) is form else expected
