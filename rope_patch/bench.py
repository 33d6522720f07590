"""Measuring rope_patch: per-call latency, table memory, import cost.

Used by ``rope-patch bench``, ``benchmarks/run_all.py`` and
``benchmarks/gpu_check.py``; end-to-end generation lives in
:mod:`rope_patch.bench_generate`.

Three forwards are timed on one rotary module, in alternating blocks so that
a noisy machine slows them alike:

- *unpatched*: the class's original function (``Cls.forward.__wrapped__``),
  called directly, or through ``nn.Module.__call__`` on an instance of an
  unpatched subclass built from the same config (``call="module"``);
- *patched*: the installed forward, answering from the module's tables;
- *floor*: a bare module that only does the two ``torch.embedding`` lookups
  on those same tables: what any table implementation must pay.

``disabled_us`` times the patched forward inside ``rope_patch.disabled()``,
so ``disabled_us - unpatched_us`` is what that path adds to the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import torch

#: Shapes (batch, seq) of the issue: decode 1x1 and 8x1, prefill 1x512 and 4x4096.
DEFAULT_SHAPES = ((1, 1), (8, 1), (1, 512), (4, 4096))
#: Position of the first decode row: a request some way into its generation.
DECODE_POSITION = 1000
#: Seconds one timed block should last (many calls at decode, one at 4x4096).
BLOCK_SECONDS = {"cpu": 0.002, "cuda": 0.005}
#: Seconds of alternating rounds per shape when ``repeats`` is not given.
SHAPE_BUDGET_SECONDS = 1.2
MIN_ROUNDS, MAX_ROUNDS = 7, 61

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def as_dtype(dtype) -> torch.dtype:
    """``torch.bfloat16`` or a name (``"bf16"``, ``"fp32"``...) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(as_dtype(dtype), str(dtype))


# --------------------------------------------------------------------------
# Configs and modules


MODEL_TYPES = ("qwen3", "llama3")


def rotary_config(model_type: str = "qwen3", max_position_embeddings: int | None = None, **overrides):
    """The config of a benchmark model (head_dim 128, as the real ones).

    Args:
        model_type: ``"qwen3"`` (Qwen3, default RoPE, theta 1e6) or
            ``"llama3"`` (Llama, rope_type llama3, theta 5e5, 128k positions).
        max_position_embeddings: override the config's value.
        overrides: other config fields (layers, hidden size, vocab...).

    Returns:
        A ``Qwen3Config`` or ``LlamaConfig``; ``rope_scaling`` is written the
        way both transformers 4.57 and 5.x accept.
    """
    import transformers

    if model_type == "qwen3":
        kwargs = {"head_dim": 128, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960}
        kwargs.update(overrides)
        if max_position_embeddings:
            kwargs["max_position_embeddings"] = max_position_embeddings
        return transformers.Qwen3Config(**kwargs)
    if model_type == "llama3":
        kwargs = {
            "head_dim": 128,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "rope_theta": 500_000.0,
            "max_position_embeddings": 131072,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
        kwargs.update(overrides)
        if max_position_embeddings:
            kwargs["max_position_embeddings"] = max_position_embeddings
        return transformers.LlamaConfig(**kwargs)
    raise ValueError(f"unknown model type {model_type!r}; use one of {MODEL_TYPES}")


def rotary_class(model_type: str) -> type:
    """The rotary class benchmarked for ``model_type``."""
    if model_type == "qwen3":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        return Qwen3RotaryEmbedding
    if model_type == "llama3":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding
    raise ValueError(f"unknown model type {model_type!r}; use one of {MODEL_TYPES}")


class Floor(torch.nn.Module):
    """The least a table implementation can do: one ``torch.embedding`` per
    output, on the tables rope_patch built (plain attributes, not buffers)."""

    def __init__(self, columns):
        super().__init__()
        self.cos, self.sin = columns

    def forward(self, x, position_ids):
        return torch.embedding(self.cos, position_ids), torch.embedding(self.sin, position_ids)


_UNPATCHED_CLASSES: dict[type, type] = {}


def unpatched_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` is the original function.

    Setting an instance's ``__class__`` to it runs the exact original forward
    through ``nn.Module.__call__`` while the instance (and its tables, keyed by
    ``id``) stays the same; rope_patch never wraps it (it lives in no modeling
    module) and ``isinstance`` checks still pass.
    """
    from rope_patch.forward import original_of

    if cls not in _UNPATCHED_CLASSES:
        original = original_of(cls.forward) or cls.forward
        _UNPATCHED_CLASSES[cls] = type(f"Unpatched{cls.__name__}", (cls,), {"forward": original})
    return _UNPATCHED_CLASSES[cls]


class patch_active:
    """Context manager: rope_patch patched for the block (patched here only if
    it was not already, and then unpatched on exit), with ``kwargs`` for
    :func:`rope_patch.patch`."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.ours = False

    def __enter__(self):
        import rope_patch

        if not rope_patch.is_patched():
            if not rope_patch.patch(**self.kwargs):
                raise RuntimeError("rope_patch.patch() did not patch (ROPE_PATCH_DISABLE set, or unsupported versions)")
            self.ours = True
        return self

    def __exit__(self, *exc):
        import rope_patch

        if self.ours:
            rope_patch.unpatch()
        return False


# --------------------------------------------------------------------------
# Timing


def _sync_of(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return None


def clock_for(device: torch.device) -> Callable[[], int]:
    """The clock to time ``device`` work with, in nanoseconds.

    One CPU thread: this thread's CPU time, so that time slices given to other
    processes on a shared machine are not counted (they otherwise dominate
    the median once the load exceeds the cores). Several threads or an
    accelerator: wall time (the other threads' work, or the device's, is not
    this thread's CPU time).
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time_ns
    return time.perf_counter_ns


def clock_name(clock: Callable[[], int]) -> str:
    return "thread CPU time" if clock is time.thread_time_ns else "wall"


def time_block(function: Callable, args: tuple, calls: int, sync=None, clock=time.perf_counter_ns) -> float:
    """Microseconds per call of ``function(*args)`` over ``calls`` calls
    (device synchronised before and after the block), measured with
    ``clock`` (see :func:`clock_for`).

    One untimed call comes first: the first call after another variant pays
    for that variant's memory traffic (at 4x4096 the allocator has to fault
    in tens of MB that the unpatched forward just released), which would bias
    against whichever variant is timed after it.
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
    device: torch.device,
    rounds: int | None = None,
    budget_s: float | None = None,
    contexts: dict[str, Callable] | None = None,
) -> dict[str, float]:
    """Microseconds per call of each variant, timed in alternating blocks
    (the order is shuffled every round, so no variant always runs first or
    right after another), on the clock of :func:`clock_for`.

    Args:
        variants: name -> (function, args).
        device: where the work runs (CUDA is synchronised around blocks).
        rounds: blocks per variant; default: as many as fit ``budget_s``
            seconds (default SHAPE_BUDGET_SECONDS), between MIN_ROUNDS and
            MAX_ROUNDS.
        contexts: name -> context manager factory entered around that
            variant's blocks (e.g. ``rope_patch.disabled``).

    Returns:
        name -> the per-block means (microseconds per call), in round order.
    """
    sync = _sync_of(device)
    clock = clock_for(device)
    contexts = contexts or {}
    budget_s = SHAPE_BUDGET_SECONDS if budget_s is None else budget_s
    block_s = BLOCK_SECONDS.get(device.type, 0.002)
    calls, once = {}, {}
    for name, (function, args) in variants.items():
        with contexts.get(name, contextlib.nullcontext)():
            time_block(function, args, 3, sync, clock)  # warm-up: tables built, caches hot
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
        shuffle(names)  # no variant always follows the same other one
        for name in names:
            function, args = variants[name]
            with contexts.get(name, contextlib.nullcontext)():
                samples[name].append(time_block(function, args, calls[name], sync, clock))
    return samples


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


_threads = threads_scope  # the earlier name (benchmarks/bench_mrope.py uses it)


# --------------------------------------------------------------------------
# Per-call latency


@dataclasses.dataclass
class LatencyRow:
    """Per-call latency of one shape.

    Attributes:
        shape: (batch, seq) of ``position_ids``.
        unpatched_us: the original forward, microseconds per call (median).
        patched_us: the installed rope_patch forward.
        floor_us: two bare ``torch.embedding`` lookups on the same tables.
        speedup: unpatched / patched.
        over_floor: patched / floor.
        disabled_us: the patched forward inside ``rope_patch.disabled()``
            (the original plus the wrapper's checks), or None if not timed.
        best_us: variant -> fastest block (a second opinion where other
            processes share the cores: their noise only ever adds time).
        model_type, dtype, threads, device, call: what was measured.
        clock: ``"thread CPU time"`` (one CPU thread) or ``"wall"``.
    """

    shape: tuple[int, int]
    unpatched_us: float
    patched_us: float
    floor_us: float
    speedup: float = dataclasses.field(init=False)
    over_floor: float = dataclasses.field(init=False)
    disabled_us: float | None = None
    best_us: dict[str, float] = dataclasses.field(default_factory=dict)
    model_type: str = ""
    dtype: str = ""
    threads: int = 0
    device: str = "cpu"
    call: str = "function"
    clock: str = "wall"

    def __post_init__(self):
        self.speedup = self.unpatched_us / self.patched_us
        self.over_floor = self.patched_us / self.floor_us

    @property
    def best_speedup(self) -> float | None:
        """unpatched / patched from the fastest blocks."""
        if "unpatched" in self.best_us and "patched" in self.best_us:
            return self.best_us["unpatched"] / self.best_us["patched"]
        return None

    @property
    def decode(self) -> bool:
        return self.shape[1] == 1


def position_ids_for(shape: tuple[int, int], device) -> torch.Tensor:
    """Contiguous int64 ``(batch, seq)`` positions: decode rows at distinct
    positions around DECODE_POSITION, prefill rows ``0..seq-1``."""
    batch, seq = shape
    if seq == 1:
        return (DECODE_POSITION + 13 * torch.arange(batch, device=device))[:, None].contiguous()
    return torch.arange(seq, device=device)[None].expand(batch, seq).contiguous()


def forward_latency(
    model_type: str = "qwen3",
    device="cpu",
    dtype=torch.bfloat16,
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    repeats: int | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    call: str = "function",
    with_disabled: bool = True,
    budget_s: float | None = None,
) -> list[LatencyRow]:
    """Per-call latency of one rotary module: unpatched, patched, floor.

    Patches with ``rope_patch.patch()`` for the measurement unless already
    patched (then the active settings, e.g. ``sync_free``, apply). Every
    shape's patched output is first checked bit-identical to the unpatched one.

    Args:
        model_type: ``"qwen3"`` or ``"llama3"`` (see :func:`rotary_config`).
        device: ``"cpu"``, ``"cuda"``...
        dtype: activation dtype (the output dtype of cos/sin).
        shapes: (batch, seq) of position_ids.
        repeats: alternating rounds per variant (default: time-bounded).
        threads: torch intra-op threads for the measurement (default: as is).
        progress: called with a short line per shape.
        call: ``"function"`` calls the forward functions directly (what the
            patch replaces); ``"module"`` goes through ``nn.Module.__call__``
            as a model does.
        with_disabled: also time the ``rope_patch.disabled()`` path.
        budget_s: seconds of timed rounds per shape when ``repeats`` is not
            given (default SHAPE_BUDGET_SECONDS).

    Returns:
        One LatencyRow per shape.

    Raises:
        AssertionError: patched output differs from unpatched, or the patched
            forward did not end up answering from a verified table.
    """
    import rope_patch
    from rope_patch import cache
    from rope_patch.forward import original_of
    from rope_patch.identity import difference

    device = torch.device(device)
    dtype = as_dtype(dtype)
    rows = []
    with patch_active(), threads_scope(threads), torch.no_grad():
        cls = rotary_class(model_type)
        patched_fn = cls.forward
        original = original_of(patched_fn)
        if original is None:
            raise RuntimeError(f"{cls.__name__} is not patched (excluded?)")
        # __wrapped__ is where functools.wraps leaves the original: same object.
        assert getattr(patched_fn, "__wrapped__", original) is original
        module = cls(rotary_config(model_type)).to(device).eval()
        # Same class, values and buffers, but the original forward: the
        # unpatched path through nn.Module.__call__ (call="module").
        twin = unpatched_class(cls)(rotary_config(model_type)).to(device).eval()
        for shape in shapes:
            x = torch.zeros(*shape, 128, device=device, dtype=dtype)
            positions = position_ids_for(shape, device)
            expected = original(module, x, positions)
            for _ in range(3):  # build, verify on first use, then hit
                got = patched_fn(module, x, positions)
            problem = difference(expected, got)
            assert problem is None, f"{model_type} {shape} {dtype}: patched differs: {problem}"
            table = cache.state_of(module).tables.get((x.device, dtype, None))  # cuda:0, not cuda
            assert table is not None and rope_patch.cache_info(module).answered, f"{model_type} {shape}: no table"
            floor = Floor(table.columns)
            assert difference(expected, floor(x, positions)) is None
            if call == "module":
                assert difference(expected, twin(x, positions)) is None
                variants = {
                    "unpatched": (twin, (x, positions)),
                    "patched": (module, (x, positions)),
                    "floor": (floor, (x, positions)),
                }
                if with_disabled:
                    variants["disabled"] = (module, (x, positions))
            else:
                variants = {
                    "unpatched": (original, (module, x, positions)),
                    "patched": (patched_fn, (module, x, positions)),
                    "floor": (floor.forward, (x, positions)),
                }
                if with_disabled:
                    variants["disabled"] = (patched_fn, (module, x, positions))
            samples = alternate(
                variants, device, rounds=repeats, budget_s=budget_s, contexts={"disabled": rope_patch.disabled}
            )
            medians = {name: statistics.median(values) for name, values in samples.items()}
            row = LatencyRow(
                shape=tuple(shape),
                unpatched_us=medians["unpatched"],
                patched_us=medians["patched"],
                floor_us=medians["floor"],
                disabled_us=medians.get("disabled"),
                best_us={name: min(values) for name, values in samples.items()},
                model_type=model_type,
                dtype=dtype_name(dtype),
                threads=torch.get_num_threads(),
                device=str(device),
                call=call,
                clock=clock_name(clock_for(device)),
            )
            rows.append(row)
            if progress:
                progress(
                    f"{model_type} {row.dtype} {shape[0]}x{shape[1]} threads={row.threads}: "
                    f"unpatched {row.unpatched_us:.1f}us patched {row.patched_us:.1f}us "
                    f"floor {row.floor_us:.1f}us ({row.speedup:.2f}x, {row.over_floor:.2f}x floor)"
                )
    return rows


# --------------------------------------------------------------------------
# Memory


@dataclasses.dataclass
class MemoryRow:
    """Bytes held by one module's tables after using positions ``0..used-1``.

    Attributes:
        model_type, dtype: what was measured.
        used: positions used (a prefill of ``used`` tokens).
        table_bytes: ``tables.table_bytes(module)`` afterwards.
        used_bytes: bytes of exactly the positions used (used x columns x dim
            x element size).
        eager_bytes: the eager approach of transformers PR #45748:
            max_position_embeddings x head_dim x 2 tables x fp32.
        max_position_embeddings: of the config.
    """

    model_type: str
    dtype: str
    used: int
    table_bytes: int
    used_bytes: int
    eager_bytes: int
    max_position_embeddings: int

    @property
    def over_used(self) -> float:
        return self.table_bytes / self.used_bytes


def table_memory(
    model_types: Iterable[str] = MODEL_TYPES,
    used: Iterable[int] = (2048, 32768),
    dtypes: Iterable = (torch.bfloat16, torch.float32),
    device="cpu",
    progress: Callable[[str], None] | None = None,
) -> list[MemoryRow]:
    """Table bytes after real use, against the bytes used and the eager approach.

    Each measurement uses a fresh module: one prefill of ``used`` positions,
    then a decode step at the last position.
    """
    import rope_patch

    device = torch.device(device)
    rows = []
    with patch_active(), torch.no_grad():
        for model_type in model_types:
            config = rotary_config(model_type)
            cls = rotary_class(model_type)
            for dtype in map(as_dtype, dtypes):
                for count in used:
                    module = cls(config).to(device).eval()
                    x = torch.zeros(1, 1, 8, device=device, dtype=dtype)
                    out = module(x, torch.arange(count, device=device)[None])
                    module(x, torch.tensor([[count - 1]], device=device))
                    width = sum(t.shape[-1] for t in out)
                    element = torch.empty((), dtype=dtype).element_size()
                    max_positions = config.max_position_embeddings
                    rows.append(
                        MemoryRow(
                            model_type=model_type,
                            dtype=dtype_name(dtype),
                            used=count,
                            table_bytes=rope_patch.cache_info(module).bytes,
                            used_bytes=count * width * element,
                            eager_bytes=max_positions * out[0].shape[-1] * 2 * 4,
                            max_position_embeddings=max_positions,
                        )
                    )
                    if progress:
                        progress(f"memory {model_type} {dtype_name(dtype)} {count}: {rows[-1].table_bytes} bytes")
                    del module, out
    return rows


# --------------------------------------------------------------------------
# Import cost


@dataclasses.dataclass
class ImportRow:
    """Wall time of importing transformers with and without rope_patch.auto.

    Attributes:
        base_ms: ``python -c "import transformers"``, median.
        patched_ms: ``python -c "import transformers, rope_patch.auto"``, median.
        added_ms: median of the per-pair differences.
        runs: pairs run (alternating).
        in_process_ms: ``import rope_patch.auto`` timed inside the
            interpreter after ``import transformers``, median over ``runs``.
        modeling_modules: modeling modules that ``import rope_patch.auto``
            imported (after ``import transformers``); must be empty.
        new_modules: how many modules ``import rope_patch.auto`` added.
    """

    base_ms: float
    patched_ms: float
    added_ms: float
    in_process_ms: float
    runs: int
    modeling_modules: list[str]
    new_modules: int


_NEW_MODULES = (
    "import sys, json, time, transformers; before = set(sys.modules); start = time.perf_counter(); "
    "import rope_patch.auto; elapsed = time.perf_counter() - start; "
    "print(json.dumps([elapsed * 1e3, sorted(set(sys.modules) - before)]))"
)


def import_cost(
    python: str | None = None,
    runs: int = 20,
    repo_root: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImportRow:
    """Time fresh interpreters importing transformers, with and without
    ``rope_patch.auto``, alternating; list the modules rope_patch.auto adds.

    Args:
        python: the interpreter (default: this one).
        runs: pairs of runs.
        repo_root: put on PYTHONPATH so the checkout is imported (default:
            the folder above this package).
    """
    python = python or sys.executable
    repo_root = repo_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    env.pop("ROPE_PATCH_DISABLE", None)
    commands = {"base": "import transformers", "patched": "import transformers, rope_patch.auto"}

    def wall(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([python, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
        return (time.perf_counter() - start) * 1e3

    for code in commands.values():  # warm the file cache
        wall(code)
    times = {name: [] for name in commands}
    for index in range(runs):
        order = list(commands) if index % 2 == 0 else list(reversed(commands))
        for name in order:
            times[name].append(wall(commands[name]))
    added = [p - b for p, b in zip(times["patched"], times["base"])]
    in_process = []
    for _ in range(runs):
        listing = subprocess.run([python, "-c", _NEW_MODULES], env=env, check=True, capture_output=True, text=True)
        elapsed_ms, new = json.loads(listing.stdout.strip().splitlines()[-1])
        in_process.append(elapsed_ms)
    modeling = [name for name in new if name.startswith("transformers.models.") or ".modeling_" in name]
    row = ImportRow(
        base_ms=statistics.median(times["base"]),
        patched_ms=statistics.median(times["patched"]),
        added_ms=statistics.median(added),
        in_process_ms=statistics.median(in_process),
        runs=runs,
        modeling_modules=modeling,
        new_modules=len(new),
    )
    if progress:
        progress(
            f"import: {row.base_ms:.0f} ms -> {row.patched_ms:.0f} ms ({row.added_ms:+.1f} ms; "
            f"in-process {row.in_process_ms:.1f} ms)"
        )
    return row


# --------------------------------------------------------------------------
# Machine


def machine_description() -> dict[str, str]:
    """CPU model, cores, threads, GPU, Python/torch/transformers/rope_patch
    versions and the date, for the header of a report."""
    import transformers

    import rope_patch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads (default)": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rope_patch": rope_patch.__version__,
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load average (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info
