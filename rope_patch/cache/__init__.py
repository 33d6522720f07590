"""The table engine: per-module cos/sin tables, built lazily from the class's
own forward, verified, grown, invalidated, and the rule that decides when
they answer.

Layout:

- :mod:`~rope_patch.cache.rule` -- may a table answer this call? (the one rule)
- :mod:`~rope_patch.cache.bounds` -- where a call's positions lie (the exact check on accelerators)
- :mod:`~rope_patch.cache.watch` -- what the forward reads, and whether it still does
- :mod:`~rope_patch.cache.table` -- a table: columns, size, device, watch, forms
- :mod:`~rope_patch.cache.forms` -- how a table answers each layout of positions
- :mod:`~rope_patch.cache.build` -- building a table from the forward itself
- :mod:`~rope_patch.cache.state` -- per-module state, outside the module
- :mod:`~rope_patch.cache.engine` -- the slow path
- :mod:`~rope_patch.cache.families` -- rope types that change state between calls
- :mod:`~rope_patch.cache.fast` -- the rule compiled for one table (what a table hit runs)
- :mod:`~rope_patch.cache.shared` -- per-layer rotaries sharing one table's columns
- :mod:`~rope_patch.cache.private` -- private copies of a module to learn from
- :mod:`~rope_patch.cache.rebuild` -- rotaries that rebuild their own cache: the rebuild replayed
- :mod:`~rope_patch.cache.numerics` -- exact numerics for building and checking

The public boundary is this module: :func:`call` (the slow path), the fast
path's two reads (:data:`states`, :mod:`rule`), :func:`cache_info`,
:func:`forget_all`, :func:`fallback_reasons`, :func:`handed_reasons`.
"""

from __future__ import annotations

from collections.abc import Iterable

from rope_patch.cache import rule
from rope_patch.cache.engine import call
from rope_patch.cache.state import (
    answered_classes,
    forget_all,
    hand_over,
    observed_fallbacks,
    observed_handed,
    state_of,
    states,
)
from rope_patch.info import CacheInfo, TableInfo


def cache_info(module) -> CacheInfo:
    """What rope_patch holds for ``module``: see :class:`rope_patch.CacheInfo`."""
    from rope_patch.cache import rebuild

    own = {rebuild.OWN_CACHE} if rebuild.answers_rebuilds(type(module)) else set()
    state = state_of(module)
    if state is None:
        return CacheInfo(tables=(), fallback=None, unpatched=tuple(own))
    with state.lock:
        items = list(state.tables.items()) + list(state.spares.items())
        fallback = state.fallback
        unpatched = tuple(sorted(set(state.never.values()) | set(state.handed) | own))
    rows = []
    for (device, dtype, layer_type), table in items:
        forms = tuple(_form_name(table, form) for _, form in sorted(table.forms.items()) if form and form.verified)
        # Shared columns count 1/k in each of the k tables answering from them.
        sharers = _sharers(table)
        columns = sum(column.numel() * column.element_size() for column in table.columns)
        held = table.nbytes() - columns + columns // sharers
        rows.append(TableInfo(device, dtype, layer_type, table.size, held, forms, sharers))
    return CacheInfo(tables=tuple(rows), fallback=fallback, unpatched=unpatched)


def _sharers(table) -> int:
    """How many modules' current tables answer from ``table``'s columns
    (tables replaced but not yet collected, forms and tables refer to each
    other, do not count)."""
    if table.shared is None:
        return 1
    count = 0
    for other in list(table.shared.tables):
        state = states.get(other.owner)
        if state is not None and any(held is other for held in (*state.tables.values(), *state.spares.values())):
            count += 1
    return max(count, 1)


def _form_name(table, form) -> str:
    name = getattr(form, "name", None)
    if name:  # a form that names itself (rope_patch.cache.rebuild)
        return name
    if form.dims == 0:
        return "seq_len"
    if form.dims == 2:
        return "2-D"
    # Recomposed axes, or the only form the forward takes (4.x Qwen2-VL): the model's M-RoPE.
    return "M-RoPE" if form.maps is not None or 2 not in table.forms else "3-D"


def fallback_reasons() -> dict[type, str]:
    """class -> why instances of it fell back at run time (first reason seen)."""
    return dict(observed_fallbacks)


def handed_reasons(classes: Iterable[type] = ()) -> dict[type, str]:
    """class -> why its calls were computed unpatched for a reason of the
    class (every reason seen, sorted and "; "-joined, as outcome() joins a
    module's), for classes none of whose calls was answered from a table
    so far. Those of ``classes`` whose cache rebuilds are answered
    (rope_patch.cache.rebuild) have OWN_CACHE among them."""
    from rope_patch.cache import rebuild

    reasons = {cls: set(seen) for cls, seen in list(observed_handed.items())}
    for cls in classes:
        if rebuild.answers_rebuilds(cls):
            reasons.setdefault(cls, set()).add(rebuild.OWN_CACHE)
    return {cls: "; ".join(sorted(seen)) for cls, seen in reasons.items() if cls not in answered_classes}


__all__ = [
    "cache_info",
    "call",
    "fallback_reasons",
    "forget_all",
    "hand_over",
    "handed_reasons",
    "rule",
    "state_of",
    "states",
]
