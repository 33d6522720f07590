"""A table: what one module's forward returns for positions ``0 .. size-1``,
for one (device, dtype, key arguments) and one frequency state."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rope_patch.cache.watch import Watch

if TYPE_CHECKING:
    from rope_patch.cache.shared import Group

#: position_ids dtypes a table answers (those torch.embedding takes).
INDEX_DTYPES = (torch.int64, torch.int32)
#: The smallest table, in positions; tables double from here.
MIN_TABLE = 64


class NotCacheable(Exception):
    """The forward cannot be answered from a table; the message says why."""


class NotPerPosition(NotCacheable):
    """The forward's output is not one row per position (a vision rotary on
    per-patch coordinates, say)."""


class Table:
    """The outputs of a forward for positions ``0 .. size-1``.

    Attributes:
        columns: one ``(size, ...)`` tensor per output, row ``p`` for position ``p``.
        container: ``tuple`` or ``list`` when the forward returns several
            tensors, None when it returns one (complex ``freqs_cis``).
        size: positions covered.
        device: where the columns live (the device of the calls answered).
        on_cpu: ``device.type == "cpu"`` (read on every call).
        watch: the frequency state the columns were computed from
            (setting it drops the compiled answers, :attr:`answers`).
        forms: ``position_ids.dim()`` -> the Form that answers such calls
            from these columns (2: planar, 3: multi-axis M-RoPE).
        bound_check: accelerators only: check positions on the host before
            gathering (an out-of-range gather is a device-side assert there).
        owner: ``id()`` of the module it answers (whose readings of
            positions its tables share, rope_patch.cache.bounds).
        top_from: 0, or the smallest largest-position a call needs for the
            table to answer without the rope type's state update running
            first (longrope's long set: the original maximum; a call below it
            is the update's to switch sets).
        shared: the rope_patch.cache.shared Group whose columns it answers
            from (with other modules' tables of equal frequency state), or None.
    """

    __slots__ = (
        "__weakref__",
        "_answers",
        "_watch",
        "bound_check",
        "columns",
        "container",
        "device",
        "forms",
        "on_cpu",
        "owner",
        "shared",
        "size",
        "top_from",
    )

    def __init__(self, columns, container, size: int, device: torch.device, watch: Watch, bound_check: bool):
        self.columns = tuple(columns)
        self.container = container
        self.size = size
        self.device = device
        self.on_cpu = device.type == "cpu"
        self._answers: dict = {}
        self.watch = watch
        self.forms: dict = {}
        self.bound_check = bound_check
        self.top_from = 0
        self.owner: int | None = None
        self.shared: Group | None = None

    @property
    def watch(self) -> Watch:
        """The frequency state the columns were computed from."""
        return self._watch

    @watch.setter
    def watch(self, watch: Watch) -> None:
        # A compiled answer checks the watch it was compiled with: a re-armed
        # watch (other objects, equal values) needs new ones.
        self._watch = watch
        self._answers = {}

    @property
    def answers(self) -> dict:
        """(form dims, activation dtype) -> its compiled answer for the
        current watch (made by rope_patch.cache.fast.answer_for)."""
        return self._answers

    def nbytes(self) -> int:
        """Bytes held: the columns and whatever the forms add."""
        own = sum(column.numel() * column.element_size() for column in self.columns)
        return own + sum(form.nbytes() for form in self.forms.values() if form is not None)

    def pack(self, outputs):
        """``outputs`` in the forward's own structure (one tensor, tuple or list)."""
        if self.container is None:
            return outputs[0]
        return tuple(outputs) if self.container is tuple else self.container(outputs)


def table_size(needed: int, cap: int, presize: int | None) -> int:
    """The size of a table covering ``needed`` positions: ``presize`` when it
    covers them (sync-free mode), else the next power of two from MIN_TABLE,
    never above ``cap``."""
    if presize is not None and needed <= presize:
        return presize
    size = MIN_TABLE
    while size < needed:
        size *= 2
    return min(size, cap)
