"""2-D ``(batch, seq)`` position_ids: one gather per output.

The table is built from these too: the forward run on ``arange(size)[None]``
gives one ``(1, size, ...)`` output per column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.table import NotCacheable, NotPerPosition
from rope_patch.identity import difference

_embedding = torch.embedding
#: Remembered output layouts per form at most (then forgotten and relearnt).
LAYOUT_MEMO_LIMIT = 64
#: A remembered layout that is what a plain gather gives: no copy needed.
_PLAIN = object()

if TYPE_CHECKING:
    #: (shape, strides) of position_ids -> the output strides, or _PLAIN.
    _Layouts = dict[tuple[torch.Size, tuple[int, ...]], object]


class PlanarForm:
    """Answers 2-D position_ids from a table's columns.

    Attributes:
        axes: 0 (the rule's check on the number of axes does not apply).
        verified: its first real call matched the unpatched forward.
        layouts: None when outputs are always contiguous. A dict when the
            forward's output layout follows the input (GPT-OSS and Llama4
            text on 4.57): per input shape/strides, the output
            strides, learnt from the forward itself on the first call of
            that shape.
    """

    dims = 2
    axes = 0
    __slots__ = ("extra", "forward", "layouts", "pair", "table", "verified")

    def __init__(self, table, forward, extra: tuple):
        self.table = table
        self.verified = False
        self.layouts: _Layouts | None = None
        self.forward = forward
        self.extra = extra
        #: (cos, sin) when a call is exactly two plain gathers.
        self.pair = table.columns if table.container is tuple and len(table.columns) == 2 else None

    @staticmethod
    def build_positions(size: int, device) -> torch.Tensor:
        """The position_ids a table of ``size`` positions is built from."""
        return torch.arange(size, device=device)[None]

    @staticmethod
    def columns_of(outputs, size: int, device) -> list[torch.Tensor]:
        """The table columns in the forward's outputs for build_positions."""
        for index, tensor in enumerate(outputs):
            if tensor.dim() != 3 or tuple(tensor.shape[:2]) != (1, size) or tensor.device != device:
                raise NotPerPosition(
                    f"output {index} has shape {tuple(tensor.shape)} on {tensor.device}; "
                    f"expected (batch, seq, dim) for position_ids of shape (1, {size})"
                )
        return [tensor[0].contiguous() for tensor in outputs]

    def nbytes(self) -> int:
        return 0  # the table's columns only

    def lookup(self, module, x, position_ids):
        """The forward's output for ``position_ids``. Raises IndexError on CPU
        for positions outside the table (the caller takes the slow path)."""
        if self.layouts is not None:
            key = (position_ids.shape, position_ids.stride())
            strides = self.layouts.get(key)
            if strides is not _PLAIN:
                return self._lookup_with_layout(module, x, position_ids, key, strides)
        if self.pair is not None:
            first, second = self.pair
            return _embedding(first, position_ids), _embedding(second, position_ids)
        return self.table.pack([_embedding(column, position_ids) for column in self.table.columns])

    def _lookup_with_layout(self, module, x, position_ids, key, strides):
        """The first call with a new input shape/stride is answered by the
        forward itself (under exact numerics) and its output strides are
        remembered (as _PLAIN when they are a plain gather's: contiguous
        positions, the usual case); later calls gather and copy into that
        layout."""
        if strides is None:
            layouts = cast("_Layouts", self.layouts)  # not None: lookup() came here through it
            with exact_numerics(x.device.type):
                out = self.forward(module, x, position_ids, *self.extra)
            if len(layouts) >= LAYOUT_MEMO_LIMIT:
                layouts.clear()
            learnt = tuple(t.stride() for t in ((out,) if self.table.container is None else out))
            plain = tuple(_embedding(column, position_ids).stride() for column in self.table.columns)
            layouts[key] = _PLAIN if learnt == plain else learnt
            return out
        out = []
        for column, stride in zip(self.table.columns, strides, strict=False):
            gathered = _embedding(column, position_ids)
            laid_out = torch.empty_strided(gathered.shape, stride, dtype=gathered.dtype, device=gathered.device)
            out.append(laid_out.copy_(gathered))
        return self.table.pack(out)

    def probe(self, module, x) -> None:
        """Compare the table with the unpatched forward on probe positions
        (shuffled, repeated, transposed, expanded, batch > 1, int32); learn
        the output layout when only strides differ; raise NotCacheable."""
        positions = probe_positions(self.table.size, x.device)
        x = x.new_ones(()).expand(x.shape)  # other values than the build's: the output must not follow them
        with exact_numerics(x.device.type):
            expected = [(p, self.forward(module, x, p, *self.extra)) for p in positions]
        problems = [difference(want, self.lookup(module, x, p)) for p, want in expected]
        if any(problems) and all(p is None or "strides" in p for p in problems):
            # Same shapes, other strides: answer in the layout the forward uses.
            self.layouts = {}
            for p, _ in expected:
                self.lookup(module, x, p)  # learns the layout
            problems = [difference(want, self.lookup(module, x, p)) for p, want in expected]
        problem = next((p for p in problems if p), None)
        if problem is not None:
            failing = next(p for (p, _), found in zip(expected, problems, strict=False) if found)
            if reads_values(self.forward, module, x, failing, self.extra, self.lookup(module, x, failing)):
                raise NotCacheable("its output depends on the values of x, not only on position_ids")
            raise NotCacheable(f"probe positions differ from the unpatched forward: {problem}")


def reads_values(forward, module, x, index, extra, answer) -> bool:
    """The forward gives the table's answer for the build's zeros but not for
    ``x``: it reads the values of x."""
    with exact_numerics(x.device.type):
        zeros = forward(module, x.new_zeros(()).expand(x.shape), index, *extra)
    return difference(zeros, answer) is None


def probe_positions(size: int, device) -> list[torch.Tensor]:
    """Positions inside a table of ``size`` that expose forwards which are
    not position-elementwise or whose output layout follows the input:
    shuffled and repeated values, batch > 1, S == 1, B == 1, a transposed
    and an expanded view, int32."""
    last = size - 1
    base = torch.tensor([[last, 0, last // 2, 0, 1], [1, last, last // 3, last, 2]], device=device) % size
    return [
        base,
        base.t(),
        base[:1].expand(3, -1),
        base[:, :1],
        base[:1],
        base[:1, :1],
        base.to(torch.int32),
    ]
