"""Multimodal RoPE: ``(axes, batch, seq)`` position_ids answered from the
same per-position tables as 2-D ones.

Vision-language rotaries (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V,
Ernie-4.5-VL, ...) take one row of positions per axis (temporal, height,
width), compute cos/sin per axis and recompose frequency sections, chunked
or interleaved, into one ``(batch, seq, dim)`` output. When the
recomposition only selects and rearranges, output column ``j`` is the 1-D
value of one axis ``a(j)``::

    out[b, s, j] = table[position_ids[a(j), b, s], j]

Forwards that keep the axis dimension (the transformers 4.x Qwen2-VL
family, which recomposes in attention; position-elementwise Llama-shaped
forwards, which treat it as one more batch dimension) are one plain gather::

    out[a, b, s] = table[position_ids[a, b, s]]

Nothing is known per model. For each number of axes, the form and ``a`` are
learnt from the module's own unpatched forward (:func:`derive`): on learning
positions where every axis runs over the table's range in a different
order, the axes that column ``j`` equals bit for bit are its candidates.
For a selection the true axis is always one, so a single candidate is the
answer and several are only accepted for a column constant over the table
(a zero frequency); none means the recomposition mixes axes. The form is
then checked on independent positions (random axes, batch > 1, decode
shapes, expanded and transposed views, int32). A column with no candidate,
or a check that differs, makes the module fall back for good with one
warning; the first real call of each form is compared with the unpatched
forward, as for any new table.

The table comes from 2-D arange positions when the forward accepts them (it
is then shared with 2-D calls), else from equal-axes positions
(``arange(size)`` on every axis); a table built that way never answers 2-D
calls (:func:`serves_planar`). Its 3-D state is ``table.mrope``, a
:class:`Forms`.
"""

from __future__ import annotations

import functools
import logging

import torch

from rope_patch import tables
from rope_patch.identity import _INT_OF_SIZE, _bits, difference

logger = logging.getLogger(__name__)

_embedding = torch.embedding
_add = torch.add
_states = tables._states
NotCacheable = tables.NotCacheable

#: Learning positions per axis at most: enough to cover the table's range,
#: few enough that learning costs about one small forward.
LEARNING_POSITIONS = 1024


class Forms(dict):
    """Per table: number of axes -> :class:`Form`, or None for an axis count
    computed unpatched (the forward rejects it or returns another structure).

    Attributes:
        planar: the table was built and probed from 2-D position_ids, so it
            also answers them; False for a table built from equal-axes
            positions (a forward that accepts only 3-D position_ids).
    """

    __slots__ = ("planar",)

    def __init__(self, planar: bool):
        super().__init__()
        self.planar = planar


class Form:
    """How one table answers position_ids with a given number of axes.

    ``Form(axes=n)`` is the per-axis form (a plain gather from the table);
    :meth:`recomposed` makes the other.

    Attributes:
        stacked: None when the output keeps the axis dimension (one plain
            gather from the table). Else, per output, the table's rows as
            integers with each axis's columns kept and the others zeroed,
            row ``p * axes + a`` for axis ``a``: a call gathers one row per
            axis and adds them up as integers. In every column all rows but
            one are zero bits, so the sum is that row's bits, exact for every
            bit pattern (-0.0 and NaN payloads included), unlike a masked
            sum of floats; and an out-of-range position is out of range of
            the stacked rows too, so torch.embedding raises as it does on
            the table itself.
        offsets: ``(axes, 1, 1)`` int64, ``0 .. axes-1``.
        dtypes: per output, the dtype the integer sum is viewed as.
        verified: the first real call was compared with the unpatched forward.
    """

    __slots__ = ("axes", "dtypes", "offsets", "stacked", "verified")

    def __init__(self, stacked=None, offsets=None, dtypes=None, axes=0):
        self.stacked = stacked
        self.offsets = offsets
        self.dtypes = dtypes
        self.axes = axes
        self.verified = False

    @classmethod
    def recomposed(cls, columns, maps, axes: int) -> Form:
        """The form reading column ``j`` of output ``k`` from axis
        ``maps[k][j]`` (see :func:`_axis_maps`) of ``axes``."""
        stacked = []
        for column, axis_of in zip(columns, maps):
            bits = column.view(_INT_OF_SIZE[column.element_size()])
            rows = torch.zeros((column.shape[0], axes, column.shape[1]), dtype=bits.dtype, device=bits.device)
            for axis in range(axes):
                rows[:, axis] = torch.where(axis_of == axis, bits, 0)
            stacked.append(rows.view(-1, column.shape[1]))
        offsets = torch.arange(axes, device=columns[0].device).view(axes, 1, 1)
        return cls(tuple(stacked), offsets, tuple(c.dtype for c in columns), axes)

    def mark_verified(self) -> None:
        self.verified = True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stacked or ())

    def lookup(self, table, x, position_ids, module):
        """The forward's output for ``position_ids`` from ``table``.

        May raise IndexError/RuntimeError (positions out of range on CPU).
        """
        if self.stacked is None:
            return table.lookup(x, position_ids, module)
        rows = _add(self.offsets, position_ids, alpha=self.axes)  # p * axes + a
        if len(self.stacked) == 2 and table.container is tuple:
            (first, second), (one, two) = self.stacked, self.dtypes
            return (
                _embedding(first, rows).sum(0, dtype=first.dtype).view(one),
                _embedding(second, rows).sum(0, dtype=second.dtype).view(two),
            )
        out = [
            _embedding(stacked, rows).sum(0, dtype=stacked.dtype).view(dtype)
            for stacked, dtype in zip(self.stacked, self.dtypes)
        ]
        if table.single:
            return out[0]
        return tuple(out) if table.container is tuple else table.container(out)


def serves_planar(table) -> bool:
    """``table`` may answer 2-D position_ids (it was built from them)."""
    return table.mrope is None or table.mrope.planar


def extra_bytes(table) -> int:
    """Bytes the 3-D forms of ``table`` hold beyond its columns."""
    return sum(form.nbytes() for form in table.mrope.values() if form is not None) if table.mrope else 0


def answered_axes_of(table) -> set[int]:
    """Axis counts ``table`` answers from a verified form."""
    return {axes for axes, form in (table.mrope or {}).items() if form is not None and form.verified}


def answered_axes(module) -> set[int]:
    """Axis counts whose calls ``module`` answers from a verified table (for
    tests and tools)."""
    state = tables.state_of(module)
    found: set[int] = set()
    for table in list(state.tables.values()) if state else ():
        if table is not None and table.mrope:
            found.update(axes for axes, form in table.mrope.items() if form is not None and form.verified)
    return found


def recombines(module) -> bool:
    """``module`` answers multi-axis (M-RoPE) position_ids from a verified
    recomposed form: its axes are mixed into one output, not kept apart."""
    state = tables.state_of(module)
    for table in list(state.tables.values()) if state else ():
        for form in (table.mrope or {}).values() if table is not None else ():
            if form is not None and form.verified and form.stacked is not None:
                return True
    return False


# --------------------------------------------------------------------------
# Calls


def answer(module, x, position_ids, layer_type):
    """The lean path: a verified form of a current table, or None.

    Needs no argument checks: a table exists only for the (device, dtype,
    layer_type) of a call that passed them, and torch.embedding raises for
    positions of another dtype or device, or out of range (on CPU).
    """
    state = _states.get(id(module))
    if state is None:
        return None
    table = state.tables.get((x.device, x.dtype, layer_type))
    if table is None or table.mrope is None:
        return None
    form = table.mrope.get(position_ids.shape[0])
    if form is None or not form.verified or not table.is_current(module) or not position_ids.numel():
        return None
    if table.bound_check and not table._in_bounds(position_ids):
        return None
    try:
        return form.lookup(table, x, position_ids, module)
    except (IndexError, RuntimeError):  # out of range on CPU: grow on the slow path
        return None


def call(module, original, x, position_ids, layer_type, extra: tuple):
    """Answer a call with 3-D position_ids (tables.slow_call's dispatch): from
    a table when its form for this axis count is known and verified, else
    build, learn, verify or compute unpatched. Same result, or same
    exception, as the unpatched forward."""
    out = answer(module, x, position_ids, layer_type)
    if out is not None:
        return out

    def unpatched():
        return original(module, x, position_ids, *extra)

    if not tables.plain_positions(x, position_ids, 3):
        return unpatched()
    state = tables._state_for(module)
    if state.fallback is not None:
        return unpatched()
    axes = position_ids.shape[0]
    with state.lock:
        build = functools.partial(_build, axes=axes)
        table = tables.table_for(module, original, x, position_ids, layer_type, extra, state, unpatched, build)
        if table is None:
            return unpatched()
        if table.mrope is None:
            table.mrope = Forms(planar=True)
        if axes not in table.mrope:
            try:
                table.mrope[axes] = derive(table, module, x, axes)
            except NotCacheable as error:
                tables._disable(module, state, f"position_ids with {axes} axes: {error}")
                return unpatched()
        form = table.mrope[axes]
        if form is None:
            return unpatched()
        if form.verified:
            try:
                return form.lookup(table, x, position_ids, module)
            except (IndexError, RuntimeError):
                return unpatched()
        return tables._verify_first_use(
            module,
            state,
            table,
            x,
            position_ids,
            unpatched,
            lookup=functools.partial(form.lookup, table),
            mark_verified=form.mark_verified,
        )


# --------------------------------------------------------------------------
# Building and learning


def _build(module, original, x, extra, state, needed: int, axes: int):
    """A table of at least ``needed`` positions: from 2-D arange positions
    when the forward accepts them (shared with 2-D calls), else from
    ``arange`` on each of ``axes`` rows."""
    try:
        return tables._build(module, original, x, extra, state, needed=needed)
    except NotCacheable as planar_error:
        try:
            return _build_from_axes(module, original, x, extra, state, needed, axes)
        except NotCacheable as error:
            raise NotCacheable(f"{planar_error}; from {axes}-axis positions: {error}") from error


def _build_from_axes(module, original, x, extra, state, needed: int, axes: int):
    """For forwards that accept only (axes, batch, seq) positions
    (transformers 4.x Qwen2-VL family): every axis gets ``arange(size)``, so
    every column holds its 1-D value whichever axis it reads."""
    device = x.device
    size = tables._table_size(needed, state)
    # A real tensor, not an expanded view: a forward may write into it.
    positions = torch.arange(size, device=device).repeat(axes, 1, 1)
    reads = tables._BufferReads(module)
    try:
        with tables.exact_numerics(device.type), reads:
            out = original(module, x, positions, *extra)
    except Exception as error:  # noqa: BLE001
        raise NotCacheable(f"forward raised {error!r}") from error
    container, outputs = tables._split_outputs(out)
    columns = []
    for index, tensor in enumerate(outputs):
        if tensor.device == device and tensor.dim() == 3 and tuple(tensor.shape[:2]) == (1, size):
            columns.append(tensor[0].contiguous())
        elif tensor.device == device and tensor.dim() == 4 and tuple(tensor.shape[1:3]) == (1, size):
            # One output row per axis: equal positions must give equal rows.
            rows = _bits(tensor[:, 0])
            if not bool((rows == rows[:1]).all()):
                raise NotCacheable(f"output {index}: equal positions on every axis give different rows")
            columns.append(tensor[0, 0].contiguous())
        else:
            raise NotCacheable(
                f"output {index} has shape {tuple(tensor.shape)} on {tensor.device} for positions of shape "
                f"{tuple(positions.shape)}"
            )
    table = tables.new_table(columns, container, size, module, x, state, original, extra, reads)
    table.mrope = Forms(planar=False)
    return table


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


def derive(table, module, x, axes: int) -> Form | None:
    """Learn from the unpatched forward how ``table`` answers position_ids
    with ``axes`` rows.

    Returns:
        A Form (its first real call not verified yet), or None when the
        forward rejects such positions or returns something that is neither
        ``(axes, batch, seq, dim)`` nor ``(batch, seq, dim)`` per output.

    Raises:
        NotCacheable: an output column reads no single axis, or the learnt
            form does not reproduce the forward on the check positions.
    """
    device = x.device
    learn = _learning_positions(table.size, axes, device)
    try:
        with tables.exact_numerics(device.type):
            expected = table.original(module, x, learn, *table.extra)
        container, outputs = tables._split_outputs(expected)
    except Exception as error:  # noqa: BLE001 - this axis count is not for tables
        logger.debug("rope_patch: %s: no table form for %d axes: %r", type(module).__name__, axes, error)
        return None
    if container is not table.container or len(outputs) != len(table.columns):
        return None
    batch_seq = tuple(learn.shape[1:])
    widths = [tuple(column.shape[1:]) for column in table.columns]
    if all(tuple(t.shape) == (axes, *batch_seq, *w) for t, w in zip(outputs, widths)):
        form = Form(axes=axes)
    elif all(tuple(t.shape) == (*batch_seq, *w) for t, w in zip(outputs, widths)):
        if not all(c.is_floating_point() and c.dim() == 2 for c in table.columns):
            return None  # complex or odd columns: no integer view to stack
        form = Form.recomposed(table.columns, _axis_maps(table.columns, learn, outputs), axes)
    else:
        logger.debug("rope_patch: %s: %d-axis output shapes fit no table form", type(module).__name__, axes)
        return None
    try:
        with tables.exact_numerics(device.type):
            checks = [
                (p, table.original(module, x, p, *table.extra)) for p in _check_positions(table.size, axes, device)
            ]
    except Exception as error:  # noqa: BLE001 - a form would answer where the forward raises
        logger.debug("rope_patch: %s: %d-axis check positions raise: %r", type(module).__name__, axes, error)
        return None
    for positions, want in checks:
        try:
            form.lookup(table, x, positions, module)  # a layout-following table learns the layout here
            problem = difference(want, form.lookup(table, x, positions, module))
        except Exception as error:  # noqa: BLE001 - any failure means "do not cache"
            problem = f"lookup raised {error!r}"
        if problem is not None:
            raise NotCacheable(
                f"the learnt form differs from the forward on positions {tuple(positions.shape)}: {problem}"
            )
    return form


def _axis_maps(columns, positions: torch.Tensor, outputs) -> tuple[torch.Tensor, ...]:
    """Per output, the axis each column reads, as a ``(dim,)`` int64 tensor:
    the axis whose 1-D values the column equals bit for bit at every
    learning position. Outputs of one width (cos and sin) must agree. A
    column equal to several axes must be constant over the table (a zero
    frequency), so that any of them is right; it takes the first."""
    matches = []
    for column, output in zip(columns, outputs):
        per_axis = _embedding(column, positions)  # (axes, 1, n, dim)
        if per_axis.dtype != output.dtype:
            raise NotCacheable(f"output dtype {output.dtype} differs from the table's {per_axis.dtype}")
        same = (_bits(per_axis) == _bits(output)[None]).flatten(1, 2).all(1)  # (axes, dim, ...)
        while same.dim() > 2:  # complex outputs: both halves must match
            same = same.all(-1)
        matches.append(same)
    maps = []
    for column, same in zip(columns, matches):
        for other in matches:
            if other.shape == same.shape:
                same = same & other
        lost = (~same.any(0)).nonzero()
        if len(lost):
            raise NotCacheable(f"output column {int(lost[0])} is no single axis's value (the recomposition mixes axes)")
        flat = _bits(column)
        constant = (flat == flat[:1]).all(0)
        while constant.dim() > 1:
            constant = constant.all(-1)
        ambiguous = ((same.sum(0) > 1) & ~constant).nonzero()
        if len(ambiguous):
            raise NotCacheable(f"output column {int(ambiguous[0])} matches several axes; cannot tell which it reads")
        maps.append(same.to(torch.uint8).argmax(0))
    return tuple(maps)
