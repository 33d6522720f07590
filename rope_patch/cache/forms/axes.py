"""Multimodal RoPE: ``(axes, batch, seq)`` position_ids answered from the
same per-position table as 2-D ones.

Vision-language rotaries (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V,
Ernie-4.5-VL, ...) take one row of positions per axis (temporal, height,
width), compute cos/sin per axis and recompose frequency sections, chunked
or interleaved, into one ``(batch, seq, dim)`` output. When the
recomposition only selects and rearranges, output column ``j`` is the 1-D
value of one axis ``a(j)``::

    out[b, s, j] = table[position_ids[a(j), b, s], j]

A call gathers each axis's rows of the table viewed as integers (``(axes,
batch, seq, dim)``), keeps in each column only the bits of its axis (a
bitwise AND with a precomputed all-ones/all-zeros mask per axis) and adds
the axes up as integers: every column is one row's bits plus zeros, so the
result is exact for every bit pattern (-0.0, NaN payloads), unlike a
masked sum of floats. Nothing is held beyond the table and one mask row
per axis. (A per-element gather or ``torch.where`` is as exact but several
times slower on CPU at prefill.) Forwards that keep the axis dimension (the
transformers 4.x Qwen2-VL family, which recomposes in attention;
position-elementwise Llama-shaped forwards, which treat it as one more batch
dimension) are one plain gather::

    out[a, b, s] = table[position_ids[a, b, s]]

Nothing is known per model. For each number of axes, the form and ``a`` are
learnt from the module's own unpatched forward (:func:`learn`): on learning
positions where every axis runs over the table's range in a different
order, the axes that column ``j`` equals bit for bit are its candidates.
For a selection the true axis is always one, so a single candidate is the
answer and several are only accepted for a column constant over the table
(a zero frequency); none means the recomposition mixes axes. The form is
then checked on independent positions (random axes, batch > 1, decode
shapes, expanded and transposed views, int32).

The table comes from 2-D arange positions when the forward accepts them
(it then answers 2-D calls too), else from equal-axes positions
(``arange(size)`` on every axis: :meth:`AxesForm.build_positions`).
"""

from __future__ import annotations

import logging

import torch

from rope_patch.cache.numerics import exact_numerics
from rope_patch.cache.table import NotCacheable, NotPerPosition
from rope_patch.identity import bits, difference

logger = logging.getLogger(__name__)

_embedding = torch.embedding

#: Learning positions per axis at most: enough to cover the table's range,
#: few enough that learning costs about one small forward.
LEARNING_POSITIONS = 1024


class AxesForm:
    """Answers ``(axes, batch, seq)`` position_ids from a table's columns.

    Attributes:
        axes: the number of axes (rows of position_ids) it answers.
        maps: None when the output keeps the axis dimension (a plain
            gather). Else, per output, a ``(dim,)`` int64 tensor: the axis
            each column reads.
        keep: per output (None when ``maps`` is), ``(axes, 1, 1, dim)``
            integers, all ones in the columns an axis feeds and zero
            elsewhere; outputs with equal maps and widths share one.
        verified: its first real call matched the unpatched forward.
    """

    dims = 3
    __slots__ = ("axes", "bits", "keep", "maps", "table", "verified")

    def __init__(self, table, axes: int, maps=None):
        self.table = table
        self.axes = axes
        self.maps = maps
        self.keep = self.bits = None
        if maps is not None:
            self.bits = tuple(bits(column) for column in table.columns)  # views: no memory
            shared: dict = {}
            self.keep = tuple(
                shared.setdefault((id(axis_of), view.dtype), _keep_masks(axis_of, axes, view.dtype))
                for axis_of, view in zip(maps, self.bits, strict=False)
            )
        self.verified = False

    @staticmethod
    def build_positions(size: int, device, axes: int) -> torch.Tensor:
        """Equal axes, ``arange(size)`` on each: for forwards that accept only
        3-D position_ids. A real tensor, not an expanded view: a forward may
        write into it."""
        return torch.arange(size, device=device).repeat(axes, 1, 1)

    @staticmethod
    def columns_of(outputs, size: int, device) -> list[torch.Tensor]:
        """The table columns in the forward's outputs for build_positions:
        ``(1, size, dim)`` outputs, or ``(axes, 1, size, dim)`` ones whose rows
        must then agree (equal positions on every axis)."""
        columns = []
        for index, tensor in enumerate(outputs):
            if tensor.device == device and tensor.dim() == 3 and tuple(tensor.shape[:2]) == (1, size):
                columns.append(tensor[0].contiguous())
            elif tensor.device == device and tensor.dim() == 4 and tuple(tensor.shape[1:3]) == (1, size):
                rows = bits(tensor[:, 0])
                if not bool((rows == rows[:1]).all()):
                    raise NotPerPosition(f"output {index}: equal positions on every axis give different rows")
                columns.append(tensor[0, 0].contiguous())
            else:
                raise NotPerPosition(
                    f"output {index} has shape {tuple(tensor.shape)} on {tensor.device} for positions of "
                    f"{size} equal axes"
                )
        return columns

    def nbytes(self) -> int:
        unique = {id(keep): keep for keep in self.keep or ()}
        return sum(keep.numel() * keep.element_size() for keep in unique.values())

    def lookup(self, module, x, position_ids):
        """The forward's output for ``position_ids``. Raises IndexError or
        RuntimeError on CPU for positions outside the table."""
        if self.maps is None:
            planar = self.table.forms.get(2)
            if planar is not None:  # the axis is one more batch dimension (and layouts follow the input)
                return planar.lookup(module, x, position_ids)
            return self.table.pack([_embedding(column, position_ids) for column in self.table.columns])
        out = []
        # bits and keep are tuples whenever maps is not None (__init__): nothing
        # on this per-call path checks it again for mypy.
        for view, keep, column in zip(self.bits, self.keep, self.table.columns, strict=False):  # type: ignore[arg-type]
            rows = _embedding(view, position_ids)  # a fresh tensor: masked in place
            rows.bitwise_and_(keep)  # each column: its axis's bits, else 0
            out.append(rows.sum(0, dtype=view.dtype).view(column.dtype))
        return self.table.pack(out)


def _keep_masks(axis_of: torch.Tensor, axes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(axes, 1, 1, dim)`` of ``dtype``: -1 (all bits) where a column reads that axis, else 0."""
    ones, zeros = torch.tensor(-1, dtype=dtype), torch.tensor(0, dtype=dtype)
    return torch.stack([torch.where(axis_of == axis, ones, zeros) for axis in range(axes)]).view(axes, 1, 1, -1)


def learn(table, module, forward, extra: tuple, x, axes: int) -> AxesForm | None:
    """Learn from the unpatched forward how ``table`` answers position_ids
    with ``axes`` rows.

    Returns:
        An AxesForm (its first real call not verified yet), or None when the
        forward rejects such positions or returns something that is neither
        ``(axes, batch, seq, dim)`` nor ``(batch, seq, dim)`` per output.

    Raises:
        NotCacheable: an output column reads no single axis, or the learnt
            form does not reproduce the forward on the check positions.
    """
    device = x.device
    positions = _learning_positions(table.size, axes, device)
    try:
        with exact_numerics(device.type):
            expected = forward(module, x, positions, *extra)
    except Exception as error:  # noqa: BLE001 - this axis count is not for tables
        logger.debug("rope_patch: %s: no table form for %d axes: %r", type(module).__name__, axes, error)
        return None
    outputs = (expected,) if isinstance(expected, torch.Tensor) else expected
    if (
        (table.container is None) != isinstance(expected, torch.Tensor)
        or (table.container is not None and type(expected) is not table.container)
        or len(outputs) != len(table.columns)
        or not all(isinstance(t, torch.Tensor) for t in outputs)
    ):
        return None
    batch_seq = tuple(positions.shape[1:])
    widths = [tuple(column.shape[1:]) for column in table.columns]
    if all(tuple(t.shape) == (axes, *batch_seq, *w) for t, w in zip(outputs, widths, strict=False)):
        form = AxesForm(table, axes)
    elif all(tuple(t.shape) == (*batch_seq, *w) for t, w in zip(outputs, widths, strict=False)):
        if not all(c.is_floating_point() and c.dim() == 2 for c in table.columns):
            return None  # complex or odd columns: no form for them
        form = AxesForm(table, axes, _axis_maps(table.columns, positions, outputs))
    else:
        logger.debug("rope_patch: %s: %d-axis output shapes fit no table form", type(module).__name__, axes)
        return None
    try:
        with exact_numerics(device.type):
            checks = [(p, forward(module, x, p, *extra)) for p in _check_positions(table.size, axes, device)]
    except Exception as error:  # noqa: BLE001 - a form would answer where the forward raises
        logger.debug("rope_patch: %s: %d-axis check positions raise: %r", type(module).__name__, axes, error)
        return None
    for p, want in checks:
        try:
            form.lookup(module, x, p)  # a layout-following table learns the layout here
            problem = difference(want, form.lookup(module, x, p))
        except Exception as error:  # noqa: BLE001 - any failure means "do not cache"
            problem = f"lookup raised {error!r}"
        if problem is not None:
            raise NotCacheable(f"the learnt form differs from the forward on positions {tuple(p.shape)}: {problem}")
    return form


def _learning_positions(size: int, axes: int, device) -> torch.Tensor:
    """(axes, 1, n): up to LEARNING_POSITIONS positions spread over the
    table's range, rolled by ``a * n / axes`` on axis ``a``, so that a
    column reading one axis differs from the others wherever its values
    are not constant."""
    count = min(size, LEARNING_POSITIONS)
    base = torch.arange(count, device=device) * size // count
    return torch.stack([base.roll(-(axis * count // axes)) for axis in range(axes)])[:, None]


def _check_positions(size: int, axes: int, device) -> list[torch.Tensor]:
    """Independent of the learning positions: random axes with batch > 1,
    decode shapes (S == 1, B == 1), equal axes (text), an expanded and a
    transposed view, int32."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.randint(0, size, (axes, 3, 5), generator=generator).to(device)
    return [
        grid,
        grid[:, :, :1],
        grid[:, :1, :1],
        grid[:1].expand(axes, -1, -1),
        grid[:, :1].expand(-1, 3, -1),
        grid.transpose(1, 2),
        grid.to(torch.int32),
    ]


def _axis_maps(columns, positions: torch.Tensor, outputs) -> tuple[torch.Tensor, ...]:
    """Per output, the axis each column reads, as a ``(dim,)`` int64 tensor:
    the axis whose 1-D values the column equals bit for bit at every
    learning position. Outputs of one width (cos and sin) must agree, and
    then share one tensor. A column equal to several axes must be constant
    over the table (a zero frequency), so that any of them is right; it
    takes the first."""
    matches = []
    for column, output in zip(columns, outputs, strict=False):
        per_axis = _embedding(column, positions)  # (axes, 1, n, dim)
        if per_axis.dtype != output.dtype:
            raise NotCacheable(f"output dtype {output.dtype} differs from the table's {per_axis.dtype}")
        same = (bits(per_axis) == bits(output)[None]).flatten(1, 2).all(1)  # (axes, dim)
        matches.append(same)
    maps: list[torch.Tensor] = []
    for column, own in zip(columns, matches, strict=True):
        same = own
        for other in matches:
            if other.shape == same.shape:
                same = same & other
        lost = (~same.any(0)).nonzero()
        if len(lost):
            raise NotCacheable(f"output column {int(lost[0])} is no single axis's value (the recomposition mixes axes)")
        flat = bits(column)
        constant = (flat == flat[:1]).all(0)
        ambiguous = ((same.sum(0) > 1) & ~constant).nonzero()
        if len(ambiguous):
            raise NotCacheable(f"output column {int(ambiguous[0])} matches several axes; cannot tell which it reads")
        axis_of = same.to(torch.uint8).argmax(0)
        shared = next((m for m in maps if m.shape == axis_of.shape and torch.equal(m, axis_of)), None)
        maps.append(shared if shared is not None else axis_of)
    return tuple(maps)
