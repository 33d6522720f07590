"""Per-call latency of one rotary module: unpatched, patched and the floor.

:func:`measure` takes a built rotary module (any class rope_patch patches)
and times three forwards on it in alternating blocks, so that a noisy machine
slows them alike, and reports medians:

- *unpatched*: the class's original forward (the function rope_patch wraps);
- *patched*: the installed forward, answering from the module's tables;
- *floor*: one bare ``torch.embedding`` per output on those same tables,
  what any table implementation must pay (absent for forwards whose output
  is not a ``(cos, sin)`` pair answered by plain gathers).

Optionally a fourth, *disabled*: the patched forward inside
``rope_patch.disabled()`` (the original plus the wrapper's checks).

Used by ``rope-patch bench`` (which chooses the module) and by the scripts
in ``benchmarks/``. Nothing here is on the patching path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import statistics
import time
from collections.abc import Callable, Iterable

import torch

#: Shapes (batch, seq) of position_ids: decode 1x1 and 8x1, prefill 1x512 and 4x4096.
DEFAULT_SHAPES = ((1, 1), (8, 1), (1, 512), (4, 4096))
#: Position of the first decode row: a request some way into its generation.
DECODE_POSITION = 1000
#: Seconds one timed block should last (many calls at decode, one at 4x4096).
BLOCK_SECONDS = {"cpu": 0.002, "cuda": 0.005}
#: Seconds of alternating rounds per shape when ``repeats`` is not given.
SHAPE_BUDGET_SECONDS = 1.2
MIN_ROUNDS, MAX_ROUNDS = 7, 61


@dataclasses.dataclass
class LatencyRow:
    """Per-call latency of one shape, in microseconds (medians of the blocks).

    Attributes:
        shape: (batch, seq) of ``position_ids``, or (axes, batch, seq).
        unpatched_us, patched_us: the original and the installed forward.
        floor_us: the bare lookups on the same tables (None: no such floor).
        disabled_us: the patched forward inside ``rope_patch.disabled()``
            (None: not timed).
        best_us: variant -> its fastest block (a second opinion where other
            processes share the cores: their noise only ever adds time).
        label, dtype, device, threads, call: what was measured.
        clock: ``"thread CPU time"`` (one CPU thread) or ``"wall"``.
    """

    shape: tuple[int, ...]
    unpatched_us: float
    patched_us: float
    floor_us: float | None = None
    disabled_us: float | None = None
    best_us: dict[str, float] = dataclasses.field(default_factory=dict)
    label: str = ""
    dtype: torch.dtype | None = None
    device: str = "cpu"
    threads: int = 0
    call: str = "function"
    clock: str = "wall"

    @property
    def speedup(self) -> float:
        """unpatched / patched."""
        return self.unpatched_us / self.patched_us

    @property
    def over_floor(self) -> float | None:
        """patched / floor."""
        return None if self.floor_us is None else self.patched_us / self.floor_us

    @property
    def best_speedup(self) -> float | None:
        """unpatched / patched from the fastest blocks."""
        if "unpatched" in self.best_us and "patched" in self.best_us:
            return self.best_us["unpatched"] / self.best_us["patched"]
        return None

    @property
    def decode(self) -> bool:
        return self.shape[1] == 1


# --------------------------------------------------------------------------
# Timing


def clock_for(device: torch.device) -> Callable[[], int]:
    """The clock to time ``device`` work with, in nanoseconds: this thread's
    CPU time on one CPU thread (time slices other processes take on a shared
    machine are then not counted), wall time otherwise."""
    if torch.device(device).type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time_ns
    return time.perf_counter_ns


def clock_name(clock: Callable[[], int]) -> str:
    return "thread CPU time" if clock is time.thread_time_ns else "wall"


def sync_for(device: torch.device) -> Callable[[], None] | None:
    """What waits for ``device`` to finish queued work (None on CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


@contextlib.contextmanager
def threads_scope(threads: int | None):
    """torch's intra-op threads set to ``threads`` for the block (None: as is)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_block(function: Callable, args: tuple, calls: int, sync=None, clock=time.perf_counter_ns) -> float:
    """Microseconds per call of ``function(*args)`` over ``calls`` calls.

    One untimed call comes first (the first call after another variant pays
    for that variant's memory traffic); the device is synchronised before
    and after the timed calls.
    """
    function(*args)
    if sync is not None:
        sync()
    start = clock()
    for _ in range(calls):
        function(*args)
    if sync is not None:
        sync()
    return (clock() - start) / calls / 1e3


def alternate(
    variants: dict[str, tuple[Callable, tuple]],
    device,
    rounds: int | None = None,
    budget_s: float | None = None,
    contexts: dict[str, Callable] | None = None,
) -> dict[str, list[float]]:
    """Time each ``name -> (function, args)`` in alternating blocks (order
    shuffled every round) on the clock of :func:`clock_for`.

    Args:
        rounds: blocks per variant; default: as many as fit ``budget_s``
            (default SHAPE_BUDGET_SECONDS), within MIN_ROUNDS..MAX_ROUNDS.
        contexts: name -> context manager factory entered around that
            variant's blocks (outside the timed calls).

    Returns:
        name -> microseconds per call of each block, in round order.
    """
    device = torch.device(device)
    sync, clock = sync_for(device), clock_for(device)
    contexts = contexts or {}
    budget_s = SHAPE_BUDGET_SECONDS if budget_s is None else budget_s
    block_s = BLOCK_SECONDS.get(device.type, 0.002)
    calls, once = {}, {}
    for name, (function, args) in variants.items():
        with contexts.get(name, contextlib.nullcontext)():
            time_block(function, args, 3, sync, clock)  # warm-up
            once[name] = time_block(function, args, 3, sync, clock)
            calls[name] = max(1, min(20000, int(block_s * 1e6 / max(once[name], 0.05))))
            time_block(function, args, calls[name], sync, clock)
    if rounds is None:
        per_round = sum(calls[name] * once[name] for name in variants) / 1e6
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / max(per_round, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(names)
        for name in names:
            function, args = variants[name]
            with contexts.get(name, contextlib.nullcontext)():
                samples[name].append(time_block(function, args, calls[name], sync, clock))
    return samples


# --------------------------------------------------------------------------
# The variants


@contextlib.contextmanager
def ensure_patched(**kwargs):
    """rope_patch patched for the block with ``kwargs`` for
    :func:`rope_patch.patch` (and unpatched on exit), unless it already is:
    then the settings in effect are kept."""
    import rope_patch

    ours = False
    if not rope_patch.is_patched():
        if not rope_patch.patch(**kwargs):
            raise RuntimeError("rope_patch.patch() did not patch (ROPE_PATCH_DISABLE set, or unsupported versions)")
        ours = True
    try:
        yield
    finally:
        if ours:
            rope_patch.unpatch()


_UNPATCHED_CLASSES: dict[type, type] = {}


def unpatched_class(cls: type[torch.nn.Module]) -> type:
    """A subclass of ``cls`` whose ``forward`` is the original function.

    Setting an instance's ``__class__`` to it runs the exact original forward
    through ``nn.Module.__call__``, on the same instance and buffers;
    rope_patch never wraps it (it lives in no modeling module).
    """
    from rope_patch.forward import original_of

    if cls not in _UNPATCHED_CLASSES:
        original = original_of(cls.forward) or cls.forward
        _UNPATCHED_CLASSES[cls] = type(f"Unpatched{cls.__name__}", (cls,), {"forward": original})
    return _UNPATCHED_CLASSES[cls]


@contextlib.contextmanager
def as_class(module, cls: type):
    """``module.__class__`` set to ``cls`` for the block."""
    before = module.__class__
    module.__class__ = cls
    try:
        yield
    finally:
        module.__class__ = before


class Floor(torch.nn.Module):
    """The least a table implementation can do: one ``torch.embedding`` per
    output on the (cos, sin) columns rope_patch built."""

    def __init__(self, columns):
        super().__init__()
        self.cos, self.sin = columns

    def forward(self, x, position_ids):
        return torch.embedding(self.cos, position_ids), torch.embedding(self.sin, position_ids)


def position_ids_for(shape: tuple[int, ...], device) -> torch.Tensor:
    """Contiguous int64 ``(batch, seq)`` positions: decode rows at distinct
    positions from DECODE_POSITION, prefill rows ``0..seq-1``; for an
    ``(axes, batch, seq)`` shape (M-RoPE), those on every axis (text tokens)."""
    if len(shape) == 3:
        axes, *plane = shape
        return position_ids_for(tuple(plane), device)[None].expand(axes, *plane).contiguous()
    batch, seq = shape
    if seq == 1:
        return (DECODE_POSITION + 13 * torch.arange(batch, device=device))[:, None].contiguous()
    return torch.arange(seq, device=device)[None].expand(batch, seq).contiguous()


def shape_name(shape: tuple[int, ...]) -> str:
    """``(1, 512)`` -> ``"1x512"``."""
    return "x".join(str(size) for size in shape)


# --------------------------------------------------------------------------


def measure(
    module: torch.nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    shapes: Iterable[tuple[int, ...]] = DEFAULT_SHAPES,
    *,
    device=None,
    hidden: int = 128,
    layer_type: str | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    budget_s: float | None = None,
    call: str = "function",
    with_disabled: bool = False,
    label: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LatencyRow]:
    """Per-call latency of ``module``'s forward: unpatched, patched, floor.

    rope_patch is patched for the measurement unless it already is (then
    the settings in effect, e.g. ``sync_free``, apply). For every shape the
    patched output is first checked bit-identical to the unpatched one and
    answered from a table.

    Args:
        module: a built rotary module (its class patched by rope_patch).
        dtype: activation dtype ``x`` is called with.
        shapes: (batch, seq), or (axes, batch, seq), of position_ids (see :func:`position_ids_for`).
        device: where ``x`` and the positions live (default: the module's).
        hidden: last dimension of ``x`` (rotary forwards read only its
            device and dtype).
        layer_type: passed as the third argument, for forwards that take one.
        repeats: alternating blocks per variant (default: time-bounded).
        threads: torch intra-op threads for the measurement (default: as is).
        budget_s: seconds of blocks per shape when ``repeats`` is not given.
        call: ``"function"`` calls the forward functions directly (what the
            patch replaces); ``"module"`` goes through ``nn.Module.__call__``
            as a model does (unpatched: the instance's class temporarily set
            to :func:`unpatched_class`).
        with_disabled: also time the patched forward inside ``rope_patch.disabled()``.
        label: names the module in rows and progress (default: its class name).
        progress: called with one line per shape.

    Returns:
        One LatencyRow per shape.

    Raises:
        AssertionError: a patched output differs from the unpatched one.
        RuntimeError: the class is not patched, or the module's calls are not
            answered from tables (the reason is in the message).
    """
    import rope_patch
    from rope_patch.forward import original_of
    from rope_patch.identity import difference

    if call not in ("function", "module"):
        raise ValueError(f"call must be 'function' or 'module', not {call!r}")
    cls = type(module)
    label = label or cls.__name__
    if device is None:
        device = next(iter((*module.buffers(), *module.parameters())), torch.empty(0)).device
    device = torch.device(device)
    extra = () if layer_type is None else (layer_type,)
    rows = []
    with ensure_patched(), threads_scope(threads), torch.no_grad():
        patched_fn = cls.forward
        original = original_of(patched_fn)
        if original is None:
            raise RuntimeError(f"{cls.__name__} is not patched (excluded, or not a rope_patch class)")
        contexts = {"disabled": rope_patch.disabled}
        if call == "module":  # the same instance, through __call__, with the original forward
            contexts["unpatched"] = lambda: as_class(module, unpatched_class(cls))
        for shape in shapes:
            x = torch.zeros(*shape[-2:], hidden, device=device, dtype=dtype)  # (batch, seq, hidden)
            positions = position_ids_for(shape, device)
            args = (x, positions, *extra)
            expected = original(module, *args)
            for _ in range(3):  # build, verify on first use, then answer
                got = patched_fn(module, *args)
            problem = difference(expected, got)
            assert problem is None, f"{label} {shape} {dtype}: patched differs from unpatched: {problem}"
            info = rope_patch.cache_info(module)
            layouts = {"2-D"} if positions.dim() == 2 else {"3-D", "M-RoPE"}
            if not any(
                (t.device, t.dtype, t.layer_type) == (x.device, dtype, layer_type) and layouts & set(t.forms)
                for t in info.tables
            ):
                why = info.fallback or "; ".join(info.unpatched) or "no call was answered from a table"
                raise RuntimeError(f"{label} {shape} {dtype}: not answered from tables: {why}")
            floor = _floor(module, x, positions, layer_type, expected)
            if call == "module":
                variants: dict[str, tuple[Callable, tuple]] = {"unpatched": (module, args), "patched": (module, args)}
                if floor is not None:
                    variants["floor"] = (floor, (x, positions))
            else:
                variants = {"unpatched": (original, (module, *args)), "patched": (patched_fn, (module, *args))}
                if floor is not None:
                    variants["floor"] = (floor.forward, (x, positions))
            if with_disabled:
                variants["disabled"] = variants["patched"]
            samples = alternate(variants, device, rounds=repeats, budget_s=budget_s, contexts=contexts)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            row = LatencyRow(
                shape=tuple(shape),
                unpatched_us=medians["unpatched"],
                patched_us=medians["patched"],
                floor_us=medians.get("floor"),
                disabled_us=medians.get("disabled"),
                best_us={name: min(values) for name, values in samples.items()},
                label=label,
                dtype=dtype,
                device=str(device),
                threads=torch.get_num_threads(),
                call=call,
                clock=clock_name(clock_for(device)),
            )
            rows.append(row)
            if progress:
                floor_text = "" if row.floor_us is None else f", floor {row.floor_us:.1f}us"
                progress(
                    f"{label} {str(dtype).replace('torch.', '')} {shape_name(shape)} threads={row.threads}: "
                    f"unpatched {row.unpatched_us:.1f}us patched {row.patched_us:.1f}us{floor_text} "
                    f"({row.speedup:.2f}x)"
                )
    return rows


def _floor(module, x, positions, layer_type, expected) -> Floor | None:
    """A Floor on ``module``'s table for this call, or None when two bare
    gathers do not reproduce the forward's output bit for bit."""
    from rope_patch import cache
    from rope_patch.identity import difference

    state = cache.state_of(module)
    table = state.tables.get((x.device, x.dtype, layer_type)) if state else None  # cuda:0, not cuda
    if table is None or table.container is not tuple or len(table.columns) != 2:
        return None
    floor = Floor(table.columns)
    return floor if difference(expected, floor(x, positions)) is None else None
