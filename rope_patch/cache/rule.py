"""May a table answer this call? The one place that decides it.

Both paths read these functions: the replacement forward's fast path
(rope_patch.forward) and the slow path (rope_patch.cache.engine), which asks
:func:`answerable` before it finds or builds a table and
:func:`answering_form` after it has built, grown, re-armed or verified one. Anything they refuse is computed
by the unpatched forward, so its result (or exception) is the user's.

:func:`steps_aside` -- the context: run the original forward untouched,
whatever the tables, while

1. dynamo traces (``torch.compile``, ``torch.export``, the dynamo ONNX
   exporter): the compiled graph is the unpatched one;
2. ``torch.jit.trace`` or the legacy ONNX exporter traces: a gather would
   bake the table into the trace as a constant;
3. a ``torch.func`` transform is active (``vmap``, ``grad``, ``jacrev``, ...):
   positions may be batched tensors, and gradients must flow to whatever the
   forward reads (``functional_call`` with a replaced ``inv_freq``);
4. a TorchDispatchMode is active (``make_fx``, FakeTensorMode,
   FlopCounterMode, ...): they observe or trace the ops;
5. ``rope_patch.disabled()`` is in effect in this thread.

:func:`answering_form` -- the table: it answers only when

6. it has a verified form for this layout of position_ids (2-D, or 3-D with
   the form's number of axes) -- the first real call of each form is
   compared with the unpatched forward before any is answered;
7. position_ids are int64 or int32, non-empty, on the table's device (a
   meta or other-device tensor raises in the unpatched forward, and must
   here too);
8. on accelerators: no CUDA graph is being captured (the graph would hold
   on to this table, which a rebuild frees), and the positions are inside
   the table (exact host check, one sync, rope_patch.cache.bounds) unless
   sync-free mode pre-sized it; on CPU the gather itself raises for
   positions outside it;
9. the module's frequency state is the table's (``Watch.holds``: every
   buffer, parameter, attribute and config value the forward read, and no
   read tensor requires grad while grad is enabled);
10. the rope type's per-call state update is a no-op for this call, or has
    just run (``table.top_from``: longrope's long set answers calls whose
    largest position is at or past the original maximum; one reading of
    the positions' extent serves this and the bound check).

The replacement forward and the slow path also require ``x`` and
position_ids to be plain tensors (subclasses, fake and functional tensors
take the original) and the call's extra arguments to be the ones the class
takes.

Public besides those: the probes :func:`steps_aside` reads
(``is_compiling``, ``is_tracing``, ``functorch_level``, ``dispatch_modes``,
``local``, ``disabling``), which the replacement forward unrolls into its
hot path, :func:`disabled`, :func:`answerable` and :func:`capturing`.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from rope_patch.cache import bounds
from rope_patch.cache.table import INDEX_DTYPES

_C = torch._C
# Dynamo replaces is_dynamo_compiling() by True while tracing; otherwise it is
# a bare ``return False`` (is_compiling() also asks jit.is_scripting()).
is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
is_tracing = _C._is_tracing
functorch_level = _C._functorch.maybe_current_level
dispatch_modes = _C._len_torch_dispatch_stack
_extent = bounds.extent


class _Local(threading.local):
    """Per-thread switch set by :func:`rope_patch.disabled`."""

    disabled = 0


local = _Local()
#: How many threads are inside :func:`disabled` now: the per-thread switch is
#: read only when this is not zero (a plain read instead of a thread-local one
#: on every call).
disabling = [0]
_disabling_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    global _disabling_lock
    _disabling_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)


@contextlib.contextmanager
def disabled():
    """Within the block, in this thread, the context requires the original
    forward (item 5)."""
    with _disabling_lock:
        disabling[0] += 1
    local.disabled += 1
    try:
        yield
    finally:
        local.disabled -= 1
        with _disabling_lock:
            disabling[0] -= 1


def steps_aside() -> bool:
    """The context requires the original forward (items 1-5 above)."""
    return bool(
        is_compiling()
        or (disabling[0] and local.disabled)
        or is_tracing()
        or functorch_level() is not None
        or dispatch_modes()
    )


def answering_form(table, x, position_ids, updated: bool = False):
    """The form of ``table`` that may answer this call, or None (items 6-10).

    Args:
        table: the table for the call's (device, dtype, key arguments).
        x: the activation (its device and dtype chose the table).
        position_ids: a plain tensor, or for ``forward(x, seq_len)`` the
            int seq_len (answered when ``1 <= seq_len <= table.size``, a host
            check: no sync on accelerators).
        updated: the rope type's state update ran for this call.
    """
    if type(position_ids) is int:
        form = table.forms.get(0)
        if form is None or not form.verified or not 0 < position_ids <= table.size:
            return None
        if not table.on_cpu and capturing(table.device):
            return None
        return form if table.watch.holds() else None
    form = table.forms.get(position_ids.dim())
    if form is None or not form.verified or (form.axes and position_ids.shape[0] != form.axes):
        return None
    if position_ids.dtype not in INDEX_DTYPES or not position_ids.numel():
        return None
    if table.on_cpu:
        if not position_ids.is_cpu:
            return None
    elif position_ids.device != table.device or capturing(table.device):
        return None
    if table.bound_check or (table.top_from and not updated):
        low, high = _extent(position_ids, table.owner, table)
        if table.bound_check and (low < 0 or high >= table.size):
            return None
        if high < table.top_from and not updated:
            return None
    if not table.watch.holds():
        return None
    return form


def answerable(x, position_ids) -> bool:
    """Whether a table could answer this call at all, before any table is
    found or built (the slow path's first question; items 7 and 8 without a
    table): a non-empty 2-D or 3-D int64/int32 tensor on x's (real) device,
    or a positive int seq_len; outside CUDA graph capture."""
    if type(position_ids) is int:
        return position_ids > 0 and x.device.type != "meta" and not capturing(x.device)
    return (
        position_ids.dim() in (2, 3)
        and position_ids.dtype in INDEX_DTYPES
        and position_ids.device == x.device
        and x.device.type != "meta"
        and position_ids.numel() != 0
        and not capturing(x.device)
    )


def capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on ``device``'s kind: no host sync, no table."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
