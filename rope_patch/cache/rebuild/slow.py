"""The slow path of a rebuild (see rope_patch.cache.rebuild): one the
replacement method could not answer from a verified table. Finds, adopts,
learns or grows the table, checks its first replay against the real
rebuild, or runs the rebuild unpatched.

Public: :func:`answer`.
"""

from __future__ import annotations

from rope_patch.cache import private, shared
from rope_patch.cache.engine import largest_table
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.rebuild.convention import REBUILD
from rope_patch.cache.rebuild.delta import NotElementwise, RebuildForm
from rope_patch.cache.rebuild.learn import Snapshot, build, state_difference
from rope_patch.cache.rule import capturing
from rope_patch.cache.state import cap, current_table, disable, drop_stale, hand_over, mark_answered, state_for
from rope_patch.cache.table import NotCacheable, Table, table_size


def answer(module, original, seq_len: int, device, dtype, args, kwargs):
    """A rebuild the replacement method (rope_patch.rebuild_method) did not
    answer from a verified table. Same effect, or same exception, as
    ``original(module, *args, **kwargs)``.

    Args:
        original: the class's own rebuild.
        seq_len, device, dtype: the call's arguments, checked by the caller
            to be an int, a torch.device and a torch.dtype.
        args, kwargs: the arguments as the call passed them.
    """
    if seq_len <= 0 or device.type == "meta" or capturing(device):
        return original(module, *args, **kwargs)
    state = state_for(module)
    if state.fallback is not None:
        return original(module, *args, **kwargs)
    with state.lock:
        key = (device, dtype, None)
        table = current_table(state, key)
        if table is not None and table.watch.needs_grad():
            return original(module, *args, **kwargs)  # autograd must see the unpatched graph
        if seq_len > state.cap:
            if state.capped is not None:
                hand_over(module, state.capped)
            return original(module, *args, **kwargs)
        if table is None or seq_len > table.size:
            table = _build(state, module, original, device, dtype, seq_len, args, kwargs)
            if table is None:
                return original(module, *args, **kwargs)
            state.tables[key] = table
        form = table.forms[REBUILD]
        if not form.verified:
            return _verify_first_use(state, module, original, table, form, seq_len, args, kwargs)
        form.program.replay(module, table.columns, seq_len)
        return None


def _build(state, module, original, device, dtype, needed: int, args, kwargs):
    """A table covering ``needed`` positions, or None (the call is then
    computed unpatched; the module is disabled when no table can be learnt)."""
    key = (device, dtype, None)
    drop_stale(state, key)
    table = shared.adopt(module, shared.REBUILD, key, needed, state.cap, _sharing_table(module, device))
    if table is not None:
        return table
    # Not pre-sized in sync-free mode: a rebuild's seq_len is a host int, there
    # is no bound to check on the device.
    size = table_size(needed, state.cap, None)

    def attempt(n):
        table = build(module, original, device, dtype, n)
        shared.publish(module, shared.REBUILD, key, table, table.forms[REBUILD].program)
        return table

    try:
        return attempt(size)
    except NotCacheable as error:
        problem = error
    if isinstance(problem, NotElementwise):
        # Not position-elementwise past some length (dynamic NTK: the
        # frequencies follow seq_len past max_position_embeddings): tables
        # stop below it, longer rebuilds are computed unpatched.
        table, above = largest_table(attempt, size - 1)
        if table is not None:
            cap(state, table.size, above or problem)
            if table.size >= needed:
                return table
            hand_over(module, state.capped)
            return None
    disable(module, state, str(problem))
    return None


def _sharing_table(module, device):
    """``make`` for shared.adopt: this module's table on a group's columns
    and Program, verified on its own first rebuild."""

    def make(group, watch):
        table = Table(group.columns, None, group.size, device, watch, bound_check=False)
        table.owner = id(module)
        table.forms[REBUILD] = RebuildForm(group.payload)
        return table

    return make


def _verify_first_use(state, module, original, table, form: RebuildForm, seq_len: int, args, kwargs):
    """The first replay of this table against the real rebuild: the
    module's whole state after each, bit for bit. The replay (and the exact
    rerun) are made on private copies of the state the call starts from;
    the module itself only sees the real rebuild."""
    start = private.private_copy(module)
    replayed = private.private_copy(start)
    form.program.replay(replayed, table.columns, seq_len)
    result = original(module, *args, **kwargs)
    problem = state_difference(Snapshot(module), Snapshot(replayed))
    if problem is not None:
        # Under TF32 or autocast the unpatched values may be rounded; the
        # table holds the exact ones, which is what we promise there.
        exact = private.private_copy(start)
        with exact_numerics(table.device.type):
            original(exact, *args, **kwargs)
        if state_difference(Snapshot(exact), Snapshot(replayed)) is not None:
            disable(module, state, f"its first cache rebuild differs from the unpatched one: {problem}", mismatch=True)
            return result
    form.verified = True
    mark_answered(module)
    return result
