"""Where a call's positions lie: the smallest and largest position, read
on the host for the exact range check before a table answers on an
accelerator, for longrope's long set (rope_patch.cache.families), and by
the slow path to size a table.

An out-of-range gather on an accelerator is a device-side assert that
poisons the process (vLLM #9965), so before a table answers there the
smallest and largest position are read on the host: a reduction and a
device-to-host copy, which waits for the device (one host sync per check).
Exactness needs the host to know; this module makes knowing as cheap as it
can be:

- **One kernel, no allocation**: ``aminmax`` writes both ends into a small
  buffer kept per thread, device and index dtype (no ``stack``, no new
  tensors), read with one copy.
- **No kernel when the positions are provably known**: the tensor object
  last reduced for the same module, unchanged since (same storage address,
  shape, strides and in-place version counter), asked about by another of
  its tables or by the slow path of the same call, is not reduced again:
  a forward that calls its rotary once per layer type (Gemma 3, ModernBERT,
  Olmo 3, ... : 21 model families on transformers 5.24) reads once per
  step, and so does a call that goes from the fast path to the slow path.
  An asker asking again about the same tensor is taken for a new step (a
  persistent position buffer refilled by a writer that bumps no version:
  a raw Triton launch, ``dist.broadcast``, numpy through ``from_numpy``)
  and reduces again; readings are never shared between modules (two models
  may share a buffer refilled between their calls). Inference tensors have
  no version counter and are always reduced.

Not seen, as for frequencies (rope_patch.cache.watch): a write that bumps
no version between a call of one of a module's tables and the next call of
another (in a model, between two layer types' rotary calls of one forward).
"""

from __future__ import annotations

import threading
import weakref

import torch

_aminmax = torch.aminmax


class _Seen:
    """The last tensor reduced: what identifies its values, its extent, the
    module it was read for and who (by id) has asked about it since."""

    __slots__ = ("askers", "high", "key", "low", "owner", "ref")

    def __init__(self, ref, key, owner: int, asker: int, low: int, high: int):
        self.ref, self.key, self.owner, self.low, self.high = ref, key, owner, low, high
        self.askers = {asker}


#: One slot for the whole process, replaced (never mutated but ``askers``)
#: so that threads read a consistent entry; a miss is only a reduction.
_last: _Seen | None = None


class _Buffers(threading.local):
    """Per thread: (device, dtype) -> (buffer, its low view, its high view)."""

    def __init__(self):
        self.by_kind: dict = {}


_buffers = _Buffers()


def extent(position_ids: torch.Tensor, owner: int, asker: object) -> tuple[int, int]:
    """The smallest and largest value of ``position_ids`` (non-empty,
    int64/int32), read on the host: from the last reduction when it is
    provably this tensor's, was made for ``owner`` and ``asker`` has not
    asked about it yet (see the module docstring), else with one reduction
    and one copy (a host sync on accelerators).

    Args:
        owner: ``id()`` of the module whose call this is.
        asker: who asks: one of its tables, or its state (the slow path).
    """
    global _last
    key = _identity(position_ids)
    seen = _last
    if (
        key is not None
        and seen is not None
        and seen.ref() is position_ids
        and seen.owner == owner
        and seen.key == key
        and id(asker) not in seen.askers
    ):
        seen.askers.add(id(asker))
        return seen.low, seen.high
    low, high = _reduce(position_ids)
    if key is not None:
        _last = _Seen(weakref.ref(position_ids), key, owner, id(asker), low, high)
    return low, high


def forget() -> None:
    """Drop the known extent (tests; rope_patch.unpatch)."""
    global _last
    _last = None


def _identity(position_ids: torch.Tensor):
    """What identifies the values of ``position_ids`` while the object lives
    (address, shape, strides, in-place version), or None for an inference
    tensor (no version counter: never known without reading it)."""
    if position_ids.is_inference():
        return None
    return (position_ids._version, position_ids.data_ptr(), position_ids.shape, position_ids.stride())


def _reduce(position_ids: torch.Tensor) -> tuple[int, int]:
    """One ``aminmax`` into this thread's buffer, one copy to the host."""
    kind = (position_ids.device, position_ids.dtype)
    entry = _buffers.by_kind.get(kind)
    if entry is None:
        # A normal tensor even when first made under inference_mode (an
        # inference tensor could not be written outside it).
        with torch.inference_mode(False):
            buffer = torch.empty(2, dtype=position_ids.dtype, device=position_ids.device)
        entry = _buffers.by_kind[kind] = (buffer, (buffer[0], buffer[1]))
    buffer, out = entry
    _aminmax(position_ids, out=out)
    low, high = buffer.tolist()
    return low, high
