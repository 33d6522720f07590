"""The slow path: a call that the fast path (rope_patch.forward) could not
answer comes here (:func:`call`).

The table for its (device, dtype, key arguments) is found (its frequency
state re-armed by value if the objects changed), adopted from a module of
equal state, built or grown, the form for the call's layout of
position_ids is learnt, the first real call of each form is compared with
the unpatched forward, and the answer comes from the table only if
:func:`rope_patch.cache.rule.answering_form` says so. Everything else is
computed by the unpatched forward: same result, or same exception. The
module's state (its tables, fallback, hand-overs) is rope_patch.cache.state.

Public: :func:`call`, :func:`largest_table` (the bisection the rebuild slow
path uses too). The engine imports nothing above it: the vision reason
comes from rope_patch.vision, not from discovery.
"""

from __future__ import annotations

import logging
from typing import cast

from rope_patch.cache import bounds, rule, shared
from rope_patch.cache.build import StateChanged, build_table, table_from
from rope_patch.cache.families import family_for
from rope_patch.cache.forms import PlanarForm, PrefixForm
from rope_patch.cache.forms import axes as axes_form
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.state import (
    ModuleState,
    cap,
    current_table,
    disable,
    drop_stale,
    hand_over,
    mark_answered,
    observe_handed,
    state_for,
    states,
)
from rope_patch.cache.table import NotCacheable, NotPerPosition, table_size
from rope_patch.identity import difference
from rope_patch.vision import VISION_REASON, is_vision

logger = logging.getLogger("rope_patch.cache")


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
        observe_handed(type(module), family)
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
