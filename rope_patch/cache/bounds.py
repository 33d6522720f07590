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
  last reduced, unchanged since (same storage address, shape, strides and
  in-place version counter), asked about by another table, is not reduced
  again. That is a forward that calls its rotary once per layer type
  (Gemma 3, ModernBERT, Olmo 3, ... : 21 model families on transformers
  5.24), two rotary modules fed the same position_ids (transformers 4.57
  Gemma 3), and the slow path, which reads the extent to size a table and
  then checks it. A table asking again about the same tensor is taken for a
  new step (a persistent position buffer rewritten by a kernel torch does
  not see, such as a raw Triton launch) and reduces again, so a buffer
  reused across steps is read once per step. Inference tensors have no
  version counter and are always reduced.

Not seen, as for frequencies (rope_patch.cache.watch): writes through
``.data`` or by a foreign kernel between two rotary calls of one forward.
"""

from __future__ import annotations

import threading
import weakref

import torch

_aminmax = torch.aminmax


class _Seen:
    """The last tensor reduced: what identifies its values, its extent, and
    the tables (by id) that have asked about it."""

    __slots__ = ("ref", "key", "low", "high", "users")

    def __init__(self, ref, key, low: int, high: int):
        self.ref, self.key, self.low, self.high = ref, key, low, high
        self.users: set[int] = set()


#: One slot for the whole process, replaced (never mutated but ``users``)
#: so that threads read a consistent entry; a miss is only a reduction.
_last: _Seen | None = None


class _Buffers(threading.local):
    """Per thread: (device, dtype) -> (buffer, its low view, its high view)."""

    def __init__(self):
        self.by_kind: dict = {}


_buffers = _Buffers()


def extent(position_ids: torch.Tensor, user: object = None) -> tuple[int, int]:
    """The smallest and largest value of ``position_ids`` (non-empty,
    int64/int32), read on the host: from the last reduction when it is
    provably this tensor's and ``user`` has not asked about it yet (see the
    module docstring), else with one reduction and one copy (a host sync on
    accelerators)."""
    global _last
    key = _identity(position_ids)
    seen = _last
    if key is not None and seen is not None and seen.ref() is position_ids and seen.key == key:
        if user is None:
            return seen.low, seen.high
        if id(user) not in seen.users:
            seen.users.add(id(user))
            return seen.low, seen.high
    low, high = _reduce(position_ids)
    if key is not None:
        fresh = _Seen(weakref.ref(position_ids), key, low, high)
        if user is not None:
            fresh.users.add(id(user))
        _last = fresh
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
