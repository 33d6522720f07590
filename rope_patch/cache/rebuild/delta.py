"""A rebuild's *state delta* (see rope_patch.cache.rebuild): the entries it
writes as a function of ``seq_len``, the Program that replays them from a
table's columns, and the form by which a table answers rebuilds.

Public: the entry kinds (:data:`SEQ_LEN`, :data:`ROWS`, :data:`CONSTANT`)
and places (:data:`ATTRIBUTE`, :data:`BUFFER`, :data:`PARAMETER`),
:class:`Entry`, :class:`Program`, :class:`RebuildForm`,
:class:`NotElementwise`.
"""

from __future__ import annotations

import dataclasses

import torch

from rope_patch.cache import shared
from rope_patch.cache.rebuild.convention import REBUILD
from rope_patch.cache.table import NotCacheable

_Tensor = torch.Tensor
_CONTIGUOUS = torch.contiguous_format

SEQ_LEN, ROWS, CONSTANT = "= seq_len", "rows", "constant"


class NotElementwise(NotCacheable):
    """The rebuild's output for one length is not the first rows of its
    output for a larger one (dynamic NTK past its original maximum)."""


#: Where an entry lives: the module's ``__dict__`` or its ``_buffers``.
ATTRIBUTE, BUFFER, PARAMETER = shared.ATTRIBUTE, shared.BUFFER, shared.PARAMETER


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry a rebuild writes.

    Attributes:
        where: ATTRIBUTE or BUFFER.
        key: its name.
        kind: SEQ_LEN, ROWS (the first seq_len rows of ``columns[column]``
            along ``dim``) or CONSTANT (``value``; a tensor is copied per replay).
        persistent: for buffers, whether the rebuild registered it persistent.
    """

    where: str
    key: str
    kind: str
    column: int = -1
    dim: int = 0
    value: object = None
    persistent: bool = False


class Program:
    """A rebuild's delta (its entries), replayed from a table's columns.
    Holds no module and no column: tables of equal frequency state can share it.

    The entries are also kept split by kind, so that a replay (once per
    rebuild, i.e. per decode step for DeepSeek-V3) only copies and assigns.
    """

    __slots__ = ("constants", "copies", "entries", "nonpersistent", "persistent", "rows", "seq_lens")

    def __init__(self, entries: tuple[Entry, ...]):
        self.entries = entries
        own = {ATTRIBUTE: False, BUFFER: True}
        #: (in _buffers, key, column, dim)
        self.rows = tuple((own[e.where], e.key, e.column, e.dim) for e in entries if e.kind == ROWS)
        #: (in _buffers, key)
        self.seq_lens = tuple((own[e.where], e.key) for e in entries if e.kind == SEQ_LEN)
        #: (in _buffers, key, tensor): copied per replay, as the rebuild makes a new one
        self.copies = tuple(
            (own[e.where], e.key, e.value) for e in entries if e.kind == CONSTANT and isinstance(e.value, _Tensor)
        )
        #: (in _buffers, key, value): immutable values
        self.constants = tuple(
            (own[e.where], e.key, e.value) for e in entries if e.kind == CONSTANT and not isinstance(e.value, _Tensor)
        )
        self.persistent = frozenset(e.key for e in entries if e.where == BUFFER and e.persistent)
        self.nonpersistent = frozenset(e.key for e in entries if e.where == BUFFER and not e.persistent)

    def values(self, columns, seq_len: int) -> dict:
        """``(where, key) -> value`` the rebuild writes for ``seq_len``: fresh tensors."""
        out = {}
        for entry in self.entries:
            if entry.kind == SEQ_LEN:
                value: object = seq_len
            elif entry.kind == ROWS:
                value = columns[entry.column].narrow(entry.dim, 0, seq_len).clone(memory_format=_CONTIGUOUS)
            elif isinstance(entry.value, _Tensor):
                value = entry.value.clone(memory_format=_CONTIGUOUS)
            else:
                value = entry.value
            out[(entry.where, entry.key)] = value
        return out

    def replay(self, module, columns, seq_len: int) -> None:
        """Write what the rebuild writes for ``seq_len`` into ``module``
        (what :meth:`values` gives, without building it)."""
        state = module.__dict__
        containers = (state, state["_buffers"])
        for in_buffers, key, column, dim in self.rows:
            containers[in_buffers][key] = columns[column].narrow(dim, 0, seq_len).clone(memory_format=_CONTIGUOUS)
        for in_buffers, key in self.seq_lens:
            containers[in_buffers][key] = seq_len
        for in_buffers, key, value in self.copies:
            containers[in_buffers][key] = value.clone(memory_format=_CONTIGUOUS)
        for in_buffers, key, constant in self.constants:
            containers[in_buffers][key] = constant
        if self.persistent or self.nonpersistent:
            names = state["_non_persistent_buffers_set"]
            names.difference_update(self.persistent)
            names.update(self.nonpersistent)


class RebuildForm:
    """How a table answers a module's rebuilds (its key in ``Table.forms``
    is REBUILD): the shared Program, and this module's own verification."""

    name = REBUILD
    dims = -1  # no position tensor
    axes = 0
    __slots__ = ("program", "verified")

    def __init__(self, program: Program):
        self.program = program
        self.verified = False

    def nbytes(self) -> int:
        return sum(
            entry.value.numel() * entry.value.element_size()
            for entry in self.program.entries
            if isinstance(entry.value, _Tensor)
        )
