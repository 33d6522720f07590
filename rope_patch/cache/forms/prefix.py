"""``forward(x, seq_len)``: the outputs for positions ``0 .. seq_len-1``
(transformers 4.x Phimoe, remote code of the ``cos_cached`` era).

A class fits when its output for ``seq_len = n`` is the first ``n`` rows of
its output for any larger ``n``: the table is the forward's own output for
``seq_len = size`` and a call is a copy of its first ``seq_len`` rows. The
probe checks that on several lengths; the first real call is compared too.
"""

from __future__ import annotations

import torch

from rope_patch.cache.forms.planar import reads_values
from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.table import NotCacheable, NotPerPosition
from rope_patch.identity import difference


class PrefixForm:
    """Answers ``seq_len`` calls from a table's columns (its first rows).

    Attributes:
        verified: its first real call matched the unpatched forward.
    """

    dims = 0  # no position tensor: the key of this form in Table.forms
    axes = 0
    __slots__ = ("extra", "forward", "table", "verified")

    def __init__(self, table, forward, extra: tuple):
        self.table = table
        self.verified = False
        self.forward = forward
        self.extra = extra

    @staticmethod
    def columns_of(outputs, size: int, device) -> list[torch.Tensor]:
        """The forward's outputs for ``seq_len = size``: one row per position."""
        for index, tensor in enumerate(outputs):
            if tensor.dim() < 1 or tensor.shape[0] != size or tensor.device != device:
                raise NotPerPosition(
                    f"output {index} has shape {tuple(tensor.shape)} on {tensor.device}; "
                    f"expected {size} rows for seq_len={size}"
                )
        return [tensor.contiguous() for tensor in outputs]

    def nbytes(self) -> int:
        return 0

    def lookup(self, module, x, seq_len: int):
        """The forward's output for ``seq_len`` (a fresh tensor, as the
        forward's own). Raises IndexError beyond the table."""
        if seq_len > self.table.size:
            raise IndexError(f"seq_len {seq_len} beyond the table's {self.table.size} positions")
        return self.table.pack([column[:seq_len].clone() for column in self.table.columns])

    def probe(self, module, x) -> None:
        """Compare with the unpatched forward on several lengths; raise NotCacheable."""
        size = self.table.size
        lengths = sorted({1, 2, 3, size // 2, size - 1, size} & set(range(1, size + 1)))
        x = x.new_ones(()).expand(x.shape)  # other values than the build's: the output must not follow them
        with exact_numerics(x.device.type):
            expected = [(n, self.forward(module, x, n, *self.extra)) for n in lengths]
        for n, want in expected:
            problem = difference(want, self.lookup(module, x, n))
            if problem is not None:
                if reads_values(self.forward, module, x, n, self.extra, self.lookup(module, x, n)):
                    raise NotCacheable("its output depends on the values of its first argument, not only on seq_len")
                raise NotCacheable(f"seq_len={n} is not the first rows of seq_len={size}: {problem}")
