"""Per-module cos/sin tables: built lazily from the class's own forward,
verified, grown, invalidated.

A table for one (device, dtype, layer_type) holds, for positions
``0..size-1``, exactly what the unpatched forward returns for those positions
(it is built by calling that forward on ``arange(size)``), so answering a call
is one gather per output. Nothing is stored on the module: state lives in
``_states`` keyed by ``id(module)`` and is dropped when the module is garbage
collected, so ``state_dict``, pickling and deepcopy never see it.

Why a table may answer a call (all checked before it is used):
- the forward is position-elementwise: at build, the table is compared with
  the unpatched forward on probe positions (shuffled, repeated, transposed,
  expanded, batch > 1, int32) and must match bit for bit, strides included;
- the frequency state is unchanged: every buffer is the same object at the
  same version counter, and every ``*scaling`` attribute has its value;
- the first real call on each new table is compared with the unpatched call.

3-D position_ids (multimodal RoPE) are rope_patch.mrope's: it answers them
from these same tables, learning per module how the axes map to columns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable

import torch

from rope_patch import settings as settings_module
from rope_patch.identity import difference

logger = logging.getLogger(__name__)

INDEX_DTYPES = (torch.int64, torch.int32)
MIN_TABLE = 64
_LAYOUT_MEMO_LIMIT = 64

_embedding = torch.embedding
_aminmax = torch.aminmax
_stack = torch.stack


class NotCacheable(Exception):
    """The forward cannot be answered from a table; the message says why."""


@contextlib.contextmanager
def exact_numerics(device_type: str):
    """Full fp32 precision, no autocast, no autograd, no inference tensors.

    Tables are built and checked here so that (a) they can serve any later
    grad mode (a table made under inference_mode could not be used in
    training), and (b) they hold exact values even when the user enabled TF32
    matmuls, which round positions above 2048 in the transformers 4.x batched
    matmul (transformers #48428).
    """
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.no_grad())
            if torch.amp.is_autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


class Table:
    """The cached outputs of one module for one (device, dtype, layer_type).

    Attributes:
        columns: one ``(size, dim)`` tensor per output of the forward.
        single: the forward returns one tensor (complex ``freqs_cis``), not a tuple.
        size: positions covered, ``0..size-1``.
        verified: the first real call was compared with the unpatched forward.
        bound_check: check positions on the host before gathering (accelerators).
    """

    __slots__ = (
        "columns",
        "single",
        "container",
        "size",
        "verified",
        "pair",
        "buffers",
        "scalars",
        "bound_check",
        "device",
        "original",
        "extra",
        "layouts",
        "mrope",
    )

    def __init__(self, columns, container, size, module, device, bound_check, original, extra, read):
        self.columns = tuple(columns)
        self.container = container
        self.single = container is None
        self.size = size
        self.verified = False
        #: (cos, sin) once verified, on CPU, when a call is exactly two plain
        #: gathers: the forward's fast path (see rope_patch.forward).
        self.pair = None
        self.device = device
        self.bound_check = bound_check
        self.original = original
        self.extra = extra
        # None: outputs are always contiguous (a cat or a fresh tensor).
        # A dict: outputs follow an input-dependent layout, learnt per input
        # shape from the unpatched forward itself (GPT-OSS and Llama4 text on 4.57).
        self.layouts = None
        # How 3-D (multimodal RoPE) position_ids are answered from these
        # columns; owned by rope_patch.mrope, None until the first such call.
        self.mrope = None
        # Watch the buffers the forward read while building (all of them if
        # it read none through torch, to stay on the safe side).
        self.buffers = tuple(
            (name, t, t._version)
            for name, t in module._buffers.items()
            if t is not None and (not read or name in read)
        )
        self.scalars = tuple(
            (name, value)
            for name, value in vars(module).items()
            if name.endswith("scaling") and isinstance(value, (int, float))
        )

    def mark_verified(self) -> None:
        """The first real call matched: enable the fast path."""
        self.verified = True
        # Accelerators keep going through answer(): bound check, graph capture.
        if self.container is tuple and len(self.columns) == 2 and self.layouts is None and self.device.type == "cpu":
            self.pair = self.columns

    def is_current(self, module) -> bool:
        """The module's frequency state is what the table was built from."""
        buffers = module._buffers
        for name, tensor, version in self.buffers:
            if tensor._version != version or buffers.get(name) is not tensor:
                return False
        attributes = module.__dict__
        for name, value in self.scalars:
            if attributes.get(name) != value:
                return False
        return True

    def answer(self, module, x, position_ids):
        """The forward's output for ``position_ids`` from the table, or None
        when this call must take the slow path (not verified yet, stale table,
        unusual position_ids, out of the checked range).

        May raise IndexError/RuntimeError from the gather (on CPU, positions
        out of range): the caller takes the slow path then.
        """
        if (
            not self.verified
            or position_ids.dim() != 2
            or position_ids.dtype not in INDEX_DTYPES
            or not position_ids.numel()
        ):
            return None
        if not self.is_current(module):
            return None
        if self.device.type != "cpu":
            # Never inside a CUDA graph being captured: it would hold on to
            # this table's memory, which a rebuild frees (and a sync breaks it).
            if _capturing(self.device):
                return None
            if self.bound_check and not self._in_bounds(position_ids):
                return None
        return self.lookup(x, position_ids, module)

    def _in_bounds(self, position_ids) -> bool:
        """The exact bound check on accelerators: one small host sync.

        An out-of-range gather there is a device-side assert that poisons the
        process (vLLM #9965), so it must not be attempted.
        """
        if position_ids.device != self.device:
            return False
        low, high = _stack(_aminmax(position_ids)).tolist()
        return 0 <= low and high < self.size

    def lookup(self, x, position_ids, module):
        """Gather every column at ``position_ids``, shaped like the forward's output."""
        if self.layouts is not None:
            return self._lookup_with_layout(x, position_ids, module)
        if self.single:
            return _embedding(self.columns[0], position_ids)
        if len(self.columns) == 2:
            first, second = self.columns
            out = (_embedding(first, position_ids), _embedding(second, position_ids))
        else:
            out = tuple(_embedding(column, position_ids) for column in self.columns)
        return out if self.container is tuple else self.container(out)

    def _lookup_with_layout(self, x, position_ids, module):
        """For forwards whose output layout follows the input: the first call
        with a new input shape/stride is answered by the forward itself (under
        exact numerics) and its output strides are remembered; later calls
        gather and copy into that layout."""
        key = (position_ids.shape, position_ids.stride())
        strides = self.layouts.get(key)
        if strides is None:
            with exact_numerics(x.device.type):
                out = self.original(module, x, position_ids, *self.extra)
            if len(self.layouts) >= _LAYOUT_MEMO_LIMIT:
                self.layouts.clear()
            self.layouts[key] = tuple(t.stride() for t in ((out,) if self.single else out))
            return out
        out = []
        for column, stride in zip(self.columns, strides):
            gathered = _embedding(column, position_ids)
            laid_out = torch.empty_strided(gathered.shape, stride, dtype=gathered.dtype, device=gathered.device)
            out.append(laid_out.copy_(gathered))
        if self.single:
            return out[0]
        return tuple(out) if self.container is tuple else self.container(out)


def _capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured: no host sync is allowed."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------
# Per-module state


class ModuleState:
    """What rope_patch keeps for one module instance, outside the module.

    Attributes:
        tables: (device, dtype, layer_type) -> Table, or None for a key that
            always takes the unpatched path (a dynamic rope type).
        fallback: why this module is never cached, or None.
        cap: the largest table size in positions.
    """

    __slots__ = ("tables", "fallback", "cap", "presize", "lock")

    def __init__(self, module, settings: settings_module.Settings):
        self.tables: dict = {}
        self.fallback: str | None = None
        max_positions = _max_position_embeddings(module)
        self.cap = settings.max_positions or max(max_positions or 0, settings_module.DEFAULT_MIN_CAP)
        self.presize = min(max_positions or self.cap, self.cap) if settings.sync_free else None
        self.lock = threading.RLock()


_states: dict[int, ModuleState] = {}
_states_lock = threading.Lock()
_warned: set[type] = set()
#: class -> reason, for classes that fell back at run time (``rope-patch list``).
observed_fallbacks: dict[type, str] = {}


def state_of(module) -> ModuleState | None:
    """The state of ``module`` if it has run a patched forward."""
    return _states.get(id(module))


def _state_for(module) -> ModuleState:
    key = id(module)
    state = _states.get(key)
    if state is None:
        with _states_lock:
            state = _states.get(key)
            if state is None:
                state = _states[key] = ModuleState(module, settings_module.active or settings_module.Settings())
                # The module owns its tables: drop them when it is collected.
                weakref.finalize(module, _states.pop, key, None)
    return state


def forget_all() -> None:
    """Drop every table and fallback record (used by ``unpatch``): after a
    new ``patch()`` modules rebuild, and decide again, on next use."""
    with _states_lock:
        for state in _states.values():
            with state.lock:
                state.tables.clear()
                state.fallback = None
        observed_fallbacks.clear()


def table_bytes(module=None) -> int:
    """Bytes held by tables, of ``module`` or of every module."""
    states = [_states.get(id(module))] if module is not None else list(_states.values())
    total = 0
    for state in states:
        for table in list(state.tables.values()) if state else ():
            if table is not None:
                total += sum(c.numel() * c.element_size() for c in table.columns)
                total += mrope.extra_bytes(table)
    return total


def _max_position_embeddings(module) -> int | None:
    config = getattr(module, "config", None)
    for source, name in (
        (config, "max_position_embeddings"),
        (module, "original_max_seq_len"),
        (module, "max_positions"),
    ):
        value = getattr(source, name, None) if source is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _position_dependent_reason(module, layer_type) -> str | None:
    """Why frequencies of this module change with position, or None.

    ``dynamic_rope_update`` rewrites inv_freq per call for "dynamic" (NTK)
    types and switches frequency sets for "longrope": a table would go stale.
    """
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(layer_type)
    if isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope"):
        return f"{rope_type} rope type: recomputed per call"
    return None


def _disable(module, state: ModuleState, reason: str) -> None:
    """Stop caching ``module`` for good; warn once per class."""
    state.fallback = reason
    state.tables.clear()
    cls = type(module)
    observed_fallbacks.setdefault(cls, reason)
    if cls not in _warned:
        _warned.add(cls)
        logger.warning("rope_patch: %s is computed unpatched from now on: %s", cls.__name__, reason)


# --------------------------------------------------------------------------
# The slow path: everything that is not a plain table hit.


def slow_call(module, original: Callable, x, position_ids, layer_type, extra: tuple):
    """Answer a call the fast path could not: build, grow, rebuild or verify
    a table, or compute unpatched. Same result, or same exception, as the
    unpatched forward."""
    if type(position_ids) is torch.Tensor and position_ids.dim() == 3:
        # (axes, batch, seq): multimodal RoPE (Qwen2-VL and kin).
        return mrope.call(module, original, x, position_ids, layer_type, extra)

    def unpatched():
        return original(module, x, position_ids, *extra)

    if not plain_positions(x, position_ids, 2):
        return unpatched()
    state = _state_for(module)
    if state.fallback is not None:
        return unpatched()
    with state.lock:
        table = table_for(module, original, x, position_ids, layer_type, extra, state, unpatched)
        if table is None or not mrope.serves_planar(table):
            return unpatched()
        if table.verified:
            try:
                return table.lookup(x, position_ids, module)
            except (IndexError, RuntimeError):
                return unpatched()
        return _verify_first_use(module, state, table, x, position_ids, unpatched)


def plain_positions(x, position_ids, dims: int) -> bool:
    """``position_ids`` is a non-empty ``dims``-D index tensor on x's device,
    outside CUDA graph capture: a call a table may answer."""
    return (
        type(position_ids) is torch.Tensor
        and position_ids.dim() == dims
        and position_ids.dtype in INDEX_DTYPES
        and position_ids.device == x.device
        and x.device.type != "meta"
        and position_ids.numel() != 0
        and not _capturing(x.device)
    )


def table_for(module, original, x, position_ids, layer_type, extra, state: ModuleState, unpatched, build=None):
    """The current table for this call's (device, dtype, layer_type),
    covering its positions: built, grown or rebuilt as needed. The caller
    holds ``state.lock``.

    Args:
        build: makes a table of at least ``needed`` positions or raises
            NotCacheable; :func:`_build` (2-D arange positions) by default.

    Returns:
        The table, or None when this call is computed unpatched (the module
        fell back, a position-dependent rope type, positions outside the cap).
        Raises what the unpatched call raises when a failed build turns out
        to be the call's own fault.
    """
    build = build or _build
    if state.fallback is not None:
        return None
    key = (x.device, x.dtype, layer_type)
    if key in state.tables and state.tables[key] is None:
        return None
    reason = _position_dependent_reason(module, layer_type)
    if reason is not None:
        state.tables[key] = None
        return None
    low, high = _stack(_aminmax(position_ids)).tolist()
    if low < 0 or high >= state.cap:
        return None
    table = state.tables.get(key)
    if table is None or high >= table.size or not table.is_current(module):
        _drop_stale(module, state)
        try:
            table = build(module, original, x, extra, state, needed=high + 1)
        except NotCacheable as error:
            table = _rebuild_exactly(module, original, x, extra, state, high + 1, error, unpatched, build)
            if table is None:
                return None
        state.tables[key] = table
    return table


def _rebuild_exactly(module, original, x, extra, state, needed, error, unpatched, build=None):
    """After a failed build: a forward whose own range ends before the
    rounded-up table size (GPT-J's fixed ``embed_positions``) gets a table of
    exactly ``needed`` positions, and the cap stops there. If the call itself
    raises, that exception propagates and nothing is disabled."""
    unpatched()  # raises when these positions are invalid for the module itself
    if _table_size(needed, state) > needed:
        state.cap = needed
        try:
            return (build or _build)(module, original, x, extra, state, needed=needed)
        except NotCacheable as retry_error:
            error = retry_error
    _disable(module, state, str(error))
    return None


def _drop_stale(module, state: ModuleState) -> None:
    """Forget tables built from frequency state the module no longer has
    (after ``.to(dtype)`` or a device move), so they do not pin memory."""
    for key, table in list(state.tables.items()):
        if table is not None and not table.is_current(module):
            del state.tables[key]


def _verify_first_use(module, state, table, x, position_ids, unpatched, lookup=None, mark_verified=None):
    """Compare the table with the unpatched forward on the first real call.

    ``lookup``/``mark_verified`` default to the table's own; rope_patch.mrope
    passes those of a 3-D form of the table.
    """
    expected = unpatched()
    try:
        actual = (lookup or table.lookup)(x, position_ids, module)
    except Exception as error:  # noqa: BLE001 - any failure means "do not cache"
        _disable(module, state, f"table lookup failed: {error!r}")
        return expected
    problem = difference(expected, actual)
    if problem is not None:
        # Under TF32 or autocast the unpatched value may be rounded; the
        # table holds the exact one, which is what we promise there.
        with exact_numerics(x.device.type):
            exact = table.original(module, x, position_ids, *table.extra)
        if difference(exact, actual) is not None:
            _disable(module, state, f"first call differs from the unpatched forward: {problem}")
            return expected
    (mark_verified or table.mark_verified)()
    return actual


def _table_size(needed: int, state: ModuleState) -> int:
    if state.presize is not None and needed <= state.presize:
        return state.presize
    size = MIN_TABLE
    while size < needed:
        size *= 2
    return min(size, state.cap)


def _build(module, original, x, extra, state: ModuleState, needed: int) -> Table:
    """Build and probe a table covering at least ``needed`` positions."""
    device = x.device
    size = _table_size(needed, state)
    positions = torch.arange(size, device=device)[None]
    reads = _BufferReads(module)
    try:
        with exact_numerics(device.type), reads:
            out = original(module, x, positions, *extra)
    except Exception as error:  # noqa: BLE001
        raise NotCacheable(f"forward on arange positions raised {error!r}") from error
    container, outputs = _split_outputs(out)
    for index, tensor in enumerate(outputs):
        if tensor.dim() != 3 or tuple(tensor.shape[:2]) != (1, size) or tensor.device != device:
            raise NotCacheable(
                f"output {index} has shape {tuple(tensor.shape)} on {tensor.device}; "
                f"expected (batch, seq, dim) for position_ids of shape (1, {size})"
            )
    columns = [tensor[0].contiguous() for tensor in outputs]
    table = new_table(columns, container, size, module, x, state, original, extra, reads)
    _probe(table, module, x)
    return table


def new_table(columns, container, size, module, x, state: ModuleState, original, extra, reads) -> Table:
    """A Table on x's device; accelerators check bounds unless sync-free
    tables were pre-sized (the one place that rule is decided)."""
    bound_check = x.device.type != "cpu" and state.presize is None
    return Table(columns, container, size, module, x.device, bound_check, original, extra, reads.names)


class _BufferReads(torch.overrides.TorchFunctionMode):
    """Records which of the module's buffers the forward passes to torch
    (``self.inv_freq.to(...)``, ``self.inv_freq[None, :, None]``), so that the
    per-call staleness check watches only those."""

    def __init__(self, module):
        super().__init__()
        self._by_id = {id(t): name for name, t in module._buffers.items() if t is not None}
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                name = self._by_id.get(id(item))
                if name is not None:
                    self.names.add(name)
        return func(*args, **kwargs)


def _split_outputs(out):
    """``(container, tensors)``: container is tuple/list, or None for one tensor."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if type(out) in (tuple, list) and out and all(isinstance(t, torch.Tensor) for t in out):
        return type(out), list(out)
    raise NotCacheable(f"forward returns {type(out).__name__}, not a tensor or a tuple of tensors")


def _probe_positions(size: int, device) -> list[torch.Tensor]:
    """Positions that expose forwards which are not position-elementwise or
    whose output layout follows the input: shuffled and repeated values,
    batch > 1, S == 1, B == 1, a transposed and an expanded view, int32."""
    last = size - 1
    base = torch.tensor([[last, 0, last // 2, 0, 1], [1, last, last // 3, last, 2]], device=device)
    return [
        base,
        base.t(),
        base[:1].expand(3, -1),
        base[:, :1],
        base[:1],
        base[:1, :1],
        base.to(torch.int32),
    ]


def _probe(table: Table, module, x) -> None:
    """Compare the table with the unpatched forward on probe positions; learn
    the output layout when it follows the input; raise NotCacheable."""
    with exact_numerics(x.device.type):
        expected = [
            (positions, table.original(module, x, positions, *table.extra))
            for positions in _probe_positions(table.size, x.device)
        ]
    problems = [difference(want, table.lookup(x, positions, module)) for positions, want in expected]
    if any(problems) and all(p is None or "strides" in p for p in problems):
        # Same shapes, other strides: answer in the layout the forward uses.
        table.layouts = {}
        for positions, _ in expected:
            table.lookup(x, positions, module)  # learns the layout
        problems = [difference(want, table.lookup(x, positions, module)) for positions, want in expected]
    problem = next((p for p in problems if p), None)
    if problem is not None:
        raise NotCacheable(f"probe positions differ from the unpatched forward: {problem}")


# mrope builds on this module (Table, table_for, _verify_first_use), so it is
# imported last: either module can then be imported first.
from rope_patch import mrope  # noqa: E402


# --------------------------------------------------------------------------
# Inspection


def cache_info(module):
    """What rope_patch holds for ``module``: see :class:`rope_patch.CacheInfo`."""
    from rope_patch.info import CacheInfo, TableInfo

    state = _states.get(id(module))
    if state is None:
        return CacheInfo(tables=(), fallback=None)
    with state.lock:
        items = list(state.tables.items())
        fallback = state.fallback
    rows = []
    for (device, dtype, layer_type), table in items:
        if table is None:
            continue
        forms = ("2-D",) if mrope.serves_planar(table) else ()
        forms += tuple(f"{axes}-axis" for axes in sorted(mrope.answered_axes_of(table)))
        nbytes = sum(c.numel() * c.element_size() for c in table.columns) + mrope.extra_bytes(table)
        rows.append(TableInfo(device, dtype, layer_type, table.size, nbytes, table.verified, forms))
    return CacheInfo(tables=tuple(rows), fallback=fallback)
