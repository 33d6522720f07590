"""GPU check of rope_patch: bit-identity on CUDA, per-call latency,
torch.compile, CUDA graphs, numerics, robustness under deterministic mode,
and greedy generate throughput. Run by ``benchmarks/gpu_check.sh`` (once per
transformers version); ``--cpu-smoke`` runs every part on CPU with tiny
shapes in seconds (CUDA-only steps print why they are skipped).

Parts (``--parts``, comma list, default all):

identity    every rotary class of the installed transformers, proved with
            ``rope_patch.diagnostics.verify.verify_class`` in fp32, bf16, fp16;
latency     per-call latency of the qwen3 and llama3 rotaries, unpatched /
            patched / floor, bf16, with the exact bound check (one host sync)
            and with ``sync_free=True``; then what each way of reading the
            positions' extent costs per check (benchmarks/bench_bounds.py:
            the old stack + tolist, rope_patch.cache.bounds' one kernel,
            pinned memory + event, and no kernel for a tensor already read);
compile     a small Qwen3 step under ``torch.compile(fullgraph=True)``,
            patched vs unpatched: step time and logits;
graph       that step captured in a CUDA graph, unpatched / patched /
            sync-free: replay time and outputs (CUDA only);
numerics    under ``torch.use_deterministic_algorithms(True)`` and TF32
            ``"high"`` precision: patched bf16/fp32 outputs for positions up
            to 32k have no NaN and equal the exact values;
robustness  bf16 under ``use_deterministic_algorithms(True)`` with
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: NaN counts of the unpatched
            and the patched rotary (alone, and inside a greedy generate of a
            Qwen3-0.6B-shaped model), whatever they are;
generate    greedy generate tokens/s, patched vs unpatched, bf16, on random-
            weight models shaped like Qwen3-0.6B (28 layers) and Llama-3-8B
            (4 of its 32 layers), in three modes: eager with the exact bound
            check, eager ``sync_free=True``, and a static cache with
            ``model.forward`` under ``torch.compile``.

Every part has a deadline (``--budget`` seconds for the whole run, split over
the parts; unused time goes to later parts); a part that runs out stops and
is reported INCOMPLETE. The run ends with markdown tables (``--summary-json
FILE`` also appends their rows to FILE; ``--print-summary FILE`` prints the
tables of every run appended there).

Exit status: 1 if any bit-identity check failed; else 3 if any part was
skipped, errored or ran out of time; else 0.
"""

from __future__ import annotations

import os

# Must be set before cuBLAS is initialised (numerics and robustness need it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import bench_bounds  # noqa: E402
import torch  # noqa: E402
from harness import generate as gen  # noqa: E402
from harness.common import MODELS, build_rotary, dtype_name, forward_latency, model_config, rotary_class  # noqa: E402
from harness.machine import machine_description  # noqa: E402

import rope_patch  # noqa: E402
from rope_patch.identity import difference  # noqa: E402

PARTS = ("identity", "latency", "compile", "graph", "numerics", "robustness", "generate")
#: Share of the budget each part may use (unused time goes to later parts).
SHARES = {
    "identity": 0.14,
    "latency": 0.10,
    "compile": 0.08,
    "graph": 0.03,
    "numerics": 0.03,
    "robustness": 0.07,
    "generate": 0.55,
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Small model for compile / graph steps (bf16 on CUDA, fp32 on CPU).
STEP_MODEL = {
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
NUMERICS_POSITIONS = 32768
#: generate: name -> (label, benchmark model type, config overrides). The
#: llama3 type brings rope_type llama3 (factor 8), theta 5e5, 131072 positions.
GENERATE_MODELS = {
    "qwen3-0.6b": (
        "Qwen3-0.6B-shaped, 28 layers",
        "qwen3",
        {
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": True,
        },
    ),
    "llama3-8b": (
        "Llama-3-8B-shaped, 4 of 32 layers",
        "llama3",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 4,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
        },
    ),
}
#: --cpu-smoke: the same models shrunk to seconds on a CPU.
SMOKE_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}
GENERATE_MODES = {
    "eager": "eager, exact bound check (default)",
    "sync_free": "eager, sync_free=True",
    "compile": "static cache, torch.compile(model.forward)",
}
#: Seconds a static-cache compile of a model needs at least (per decoder
#: layer, and fixed), on an H100/H200: the mode is skipped when less is left.
COMPILE_SECONDS = (2.5, 30.0)
GENERATE_PROMPT = 16


def log(line: str = "") -> None:
    print(line, flush=True)


class Outcome:
    """What the run found: failures, incomplete parts, summary lines, table rows."""

    def __init__(self, transformers_version: str, summary_json: str | None = None):
        self.failures: list[str] = []
        self.incomplete: list[str] = []
        self.summary: list[str] = []
        self.rows: list[dict] = []
        self.transformers = transformers_version
        self.summary_json = summary_json

    def fail(self, line: str) -> None:
        self.failures.append(line)
        log(f"FAIL {line}")

    def skip(self, part: str, reason: str, incomplete: bool = True) -> None:
        """A part or a step of it did not run: printed, and counted unless allowed."""
        log(f"SKIPPED {part}: {reason}")
        if incomplete:
            self.incomplete.append(f"{part}: {reason}")

    def row(self, table: str, **cells) -> None:
        """A row of a summary table; appended to ``summary_json`` at once, so
        that a run killed at its time limit keeps what it measured."""
        row = {"table": table, "transformers": self.transformers, **cells}
        self.rows.append(row)
        if self.summary_json:
            with open(self.summary_json, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def status(self) -> int:
        if self.failures:
            return 1
        return 3 if self.incomplete else 0


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def repatched(**kwargs):
    """Patched with ``kwargs`` for the block (unpatch forgets earlier tables);
    patched with defaults again afterwards."""
    if rope_patch.is_patched():
        rope_patch.unpatch()
    if not rope_patch.patch(**kwargs):
        raise RuntimeError(f"rope_patch.patch({kwargs}) did not patch")
    try:
        yield
    finally:
        rope_patch.unpatch()
        rope_patch.patch()


@contextlib.contextmanager
def unpatched_scope():
    """rope_patch fully unpatched for the block (the class's own forward)."""
    was = rope_patch.is_patched()
    if was:
        rope_patch.unpatch()
    try:
        yield
    finally:
        if was:
            rope_patch.patch()


@contextlib.contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def matmul_precision(value: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def nan_count(out) -> int:
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return sum(int(torch.isnan(t).sum()) for t in tensors if t.is_floating_point())


def numel(out) -> int:
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.numel() for t in tensors)


# --------------------------------------------------------------------------
# identity


def part_identity(device, deadline: Deadline, outcome: Outcome, args) -> None:
    from rope_patch.diagnostics.scan import scan_catalog
    from rope_patch.diagnostics.verify import verify_class
    from rope_patch.status import Status

    start = time.monotonic()
    catalog = scan_catalog(pattern=args.identity_pattern)
    rotaries = catalog.rotaries[: args.limit] if args.limit else catalog.rotaries
    log(
        f"identity: {len(catalog.rotaries)} rotary classes"
        + (f" matching {args.identity_pattern!r}" if args.identity_pattern else "")
        + f" ({catalog.modules} modules, {len(catalog.failures)} failed to import; "
        f"{time.monotonic() - start:.1f} s); verifying {len(rotaries)}"
    )
    counts = dict.fromkeys(("verified", "cached", "fallback", "unsupported", "excluded", "not built"), 0)
    mismatches = 0
    for index, rotary in enumerate(rotaries):
        if deadline.passed():
            outcome.skip("identity", f"deadline after {index} of {len(rotaries)} classes")
            break
        label = f"{rotary.model_type}.{rotary.name}"
        try:
            result = verify_class(rotary, device, DTYPES, cases="all")
        except Exception as error:  # noqa: BLE001 - the verifier itself broke: a failure
            outcome.fail(f"identity {label}: verify_class raised {error!r}")
            continue
        for problem in result.problems:
            mismatches += 1
            outcome.fail(f"identity {label}: {problem}")
        if result.status is Status.UNSUPPORTED:
            counts["unsupported"] += 1
        elif result.status is Status.EXCLUDED:
            counts["excluded"] += 1
        elif not result.built:
            counts["not built"] += 1
            log(f"  not built: {label}: {result.reason[:160]}")
        else:
            counts["verified"] += 1
            cached = result.status is Status.CACHED
            counts["cached" if cached else "fallback"] += 1
            if not cached:
                log(f"  computed unpatched (not a failure): {label}: {result.reason[:160]}")
        if index % 20 == 19:
            free_memory(device)
    line = (
        f"identity on {device}: {counts['verified']} classes verified in fp32/bf16/fp16 "
        f"({counts['cached']} answered from tables, {counts['fallback']} computed unpatched by design), "
        f"{counts['unsupported']} unsupported, {counts['excluded']} excluded, {counts['not built']} not built; "
        f"{mismatches} mismatches"
    )
    outcome.summary.append(line)
    outcome.row("checks", part="identity", result=line)
    log(line)


# --------------------------------------------------------------------------
# latency


def part_latency(device, deadline: Deadline, outcome: Outcome, args) -> None:
    if args.cpu_smoke:
        shapes = ((1, 1), (1, 64))
    else:
        shapes = ((1, 1), (1, 512)) if args.quick else ((1, 1), (8, 1), (1, 512), (4, 4096))
    modes = {"exact bound check": {}, "sync_free": {"sync_free": True}}
    per_shape = max(deadline.left(), 1) / (len(modes) * len(shapes) * len(MODELS) * 1.5)
    budget_s = min(0.6, max(per_shape, 0.1))
    repeats = 3 if args.cpu_smoke else None
    rows = []
    try:
        for model_type in MODELS:
            for mode, kwargs in modes.items():
                if deadline.passed():
                    outcome.skip("latency", f"deadline before {model_type} {mode}")
                    return
                with repatched(**kwargs):
                    measured = forward_latency(
                        model_type,
                        device,
                        torch.bfloat16,
                        shapes,
                        repeats=repeats,
                        budget_s=budget_s,
                        with_disabled=True,
                        progress=log,
                    )
                    rows.extend((mode, row) for row in measured)
    except AssertionError as error:
        outcome.fail(f"latency: {error}")
    finally:
        _print_latency(rows)
    _bounds_latency(device, deadline, outcome, args)
    for mode, r in rows:
        outcome.row(
            "latency",
            model=r.label,
            mode=mode,
            shape=f"{r.shape[0]}x{r.shape[1]}",
            unpatched_us=r.unpatched_us,
            patched_us=r.patched_us,
            floor_us=r.floor_us,
            speedup=r.speedup,
        )
        if r.shape in ((1, 1), (4, 4096)):
            outcome.summary.append(
                f"latency {r.label} bf16 {r.shape[0]}x{r.shape[1]} {mode}: unpatched {r.unpatched_us:.1f} us, "
                f"patched {r.patched_us:.1f} us ({r.speedup:.2f}x), floor {_us(r.floor_us)} us"
            )


def _bounds_latency(device, deadline: Deadline, outcome: Outcome, args) -> None:
    """Per-check cost of each way of reading the positions' extent."""
    if deadline.passed():
        outcome.skip("latency", "deadline before the bound-check ways")
        return
    try:
        checks = bench_bounds.measure(device, rounds=3 if args.cpu_smoke else 11)
    except AssertionError as error:
        outcome.fail(f"latency: bound-check ways: {error}")
        return
    base = {r["shape"]: r["us"] for r in checks if r["way"] == "stack + tolist"}
    log("| shape | way of reading the extent | us per check | vs stack + tolist |")
    log("|---|---|---|---|")
    for r in checks:
        log(f"| {r['shape']} | {r['way']} | {r['us']:.2f} | {r['us'] / base[r['shape']]:.2f}x |")
        outcome.row("bounds", shape=r["shape"], way=r["way"], us=r["us"], ratio=r["us"] / base[r["shape"]])
        if r["shape"] == "1x1":
            outcome.summary.append(f"bound check 1x1 {r['way']}: {r['us']:.2f} us")
    log()


def _us(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _print_latency(rows) -> None:
    if not rows:
        return
    log()
    log("| model | mode | shape | unpatched us | patched us | floor us | speedup | patched/floor | disabled() us |")
    log("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows:
        over = "-" if r.over_floor is None else f"{r.over_floor:.2f}x"
        log(
            f"| {r.label} | {mode} | {r.shape[0]}x{r.shape[1]} | {r.unpatched_us:.1f} | {r.patched_us:.1f} | "
            f"{_us(r.floor_us)} | {r.speedup:.2f}x | {over} | {_us(r.disabled_us)} |"
        )
    log()


# --------------------------------------------------------------------------
# compile and graph


def _step_model(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return gen.build_model(STEP_MODEL, dtype=dtype, device=device)


def _step_inputs(device, seq: int = 1):
    input_ids = torch.randint(1, gen.VOCAB, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    positions = (1000 + torch.arange(seq))[None].to(device)
    return input_ids, positions


def _time_steps(function, device, deadline: Deadline, rounds: int = 30, calls: int = 20) -> float:
    """Median microseconds per call over ``rounds`` blocks of ``calls``."""
    samples = []
    for _ in range(rounds):
        if deadline.passed() and samples:
            break
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            function()
        sync(device)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def part_compile(device, deadline: Deadline, outcome: Outcome, args) -> None:
    import torch._dynamo

    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    model = _step_model(device)
    input_ids, positions = _step_inputs(device)
    results, errors = {}, {}
    rounds = 3 if args.cpu_smoke else 30
    with torch.no_grad():
        for mode in ("unpatched", "patched"):
            if deadline.passed():
                outcome.skip("compile", f"deadline before the {mode} compile")
                break
            torch._dynamo.reset()
            scope = contextlib.nullcontext() if mode == "patched" else unpatched_scope()
            with scope:
                compiled = torch.compile(model, fullgraph=True, backend=backend)

                def step(compiled=compiled):
                    return compiled(input_ids, position_ids=positions, use_cache=False).logits

                start = time.perf_counter()
                try:
                    logits = step()
                    sync(device)
                except Exception as error:  # noqa: BLE001
                    errors[mode] = f"{type(error).__name__}: {str(error)[:300]}"
                    log(f"compile {mode} (fullgraph, {backend}) raised {errors[mode]}")
                    continue
                compile_s = time.perf_counter() - start
                step_us = _time_steps(step, device, deadline, rounds=rounds)
            results[mode] = (logits.float().cpu(), compile_s, step_us)
            log(f"compile {mode}: first call {compile_s:.1f} s (compile), step {step_us:.1f} us ({backend}, fullgraph)")
    torch._dynamo.reset()
    if "patched" in errors and "unpatched" not in errors:
        outcome.fail(
            f"compile: the patched model fails under fullgraph compile, the unpatched one does not: {errors['patched']}"
        )
    elif errors:
        outcome.skip("compile", f"the unpatched model itself does not compile here: {errors.get('unpatched')}")
    if len(results) == 2:
        same = torch.equal(results["patched"][0], results["unpatched"][0])
        line = (
            f"compile ({backend}, fullgraph=True, one-token step of a {STEP_MODEL['num_hidden_layers']}-layer Qwen3, "
            f"no cache): patched {results['patched'][2]:.1f} us vs unpatched {results['unpatched'][2]:.1f} us per step "
            f"({results['unpatched'][2] / results['patched'][2]:.3f}x); logits identical: {same}"
        )
        outcome.summary.append(line)
        outcome.row("checks", part="compile", result=line)
        log(line)
        if not same:
            outcome.fail("compile: logits of the patched and unpatched compiled models differ")


def part_graph(device, deadline: Deadline, outcome: Outcome, args) -> None:
    """Capture (a) the rotary module alone and (b) a whole one-token model
    step, unpatched, patched with the exact bound check and sync-free; replay
    at two positions and compare with eager unpatched outputs."""
    if device.type != "cuda":
        outcome.skip("graph", "CUDA graphs need a CUDA device", incomplete=not args.allow_cpu_skips)
        return
    model = _step_model(device)
    rotary = model.model.rotary_emb
    input_ids, positions = _step_inputs(device)
    static_positions = positions.clone()
    x = torch.zeros(1, 1, 8, device=device, dtype=next(model.parameters()).dtype)
    units = {
        "rotary": lambda: rotary(x, static_positions),
        "model step": lambda: model(input_ids, position_ids=static_positions, use_cache=False).logits,
    }
    reference = {}
    with torch.no_grad(), rope_patch.disabled():
        for unit, call in units.items():
            for position in (1000, 3000):
                static_positions.fill_(position)
                out = call()
                reference[unit, position] = tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
    modes = {"unpatched": None, "patched": {}, "patched sync_free": {"sync_free": True}}
    times, captured = {}, {}
    for unit, call in units.items():
        for mode, kwargs in modes.items():
            if deadline.passed():
                outcome.skip("graph", f"deadline before {unit} {mode}")
                break
            scope = unpatched_scope() if kwargs is None else repatched(**kwargs)
            with scope, torch.no_grad():
                static_positions.fill_(1000)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):  # warm-up outside capture: tables are built here
                        call()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        out = call()
                except Exception as error:  # noqa: BLE001
                    captured[unit, mode] = f"{type(error).__name__}: {str(error)[:200]}"
                    log(f"graph {unit} {mode}: capture raised {captured[unit, mode]}")
                    continue
                captured[unit, mode] = None
                for position in (1000, 3000):
                    static_positions.fill_(position)
                    graph.replay()
                    torch.cuda.synchronize()
                    problem = difference(reference[unit, position], out)
                    if problem:
                        outcome.fail(f"graph {unit} {mode}: replay at position {position}: {problem}")
                held = sorted(table.positions for table in rope_patch.cache_info(rotary).tables)
                times[unit, mode] = _time_steps(graph.replay, device, deadline, rounds=20, calls=50)
                log(f"graph {unit} {mode}: replay {times[unit, mode]:.1f} us; rotary tables held (positions): {held}")
                del graph, out
        unpatched_captures = (unit, "unpatched") in captured and captured[unit, "unpatched"] is None
        if unpatched_captures and any(captured.get((unit, m)) for m in modes if m != "unpatched"):
            outcome.fail(f"graph {unit}: the patched forward breaks a capture that works unpatched")
        elif captured.get((unit, "unpatched")):
            outcome.skip("graph", f"{unit} does not capture even unpatched here")
    for unit in units:
        line = f"graph replay, {unit}: " + ", ".join(f"{m} {t:.1f} us" for (u, m), t in times.items() if u == unit)
        outcome.summary.append(line)
        outcome.row("checks", part="graph", result=line)
        log(line)


# --------------------------------------------------------------------------
# numerics


def part_numerics(device, deadline: Deadline, outcome: Outcome, args) -> None:
    count = 512 if args.cpu_smoke else 4096 if args.quick else NUMERICS_POSITIONS
    prefill = torch.arange(count, device=device)[None]
    decode = torch.randint(0, count, (8, 1), generator=torch.Generator().manual_seed(3)).to(device)
    modes = {"deterministic": deterministic, "tf32 'high'": lambda: matmul_precision("high")}
    for model_type in MODELS:
        config = model_config(
            model_type, max_position_embeddings=max(count, MODELS[model_type].kwargs["max_position_embeddings"])
        )
        cls = rotary_class(model_type)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.zeros(1, 1, 8, device=device, dtype=dtype)
            exact_module = cls(config).to(device)
            exact = {name: _formula(exact_module, x, pos) for name, pos in (("prefill", prefill), ("decode", decode))}
            with torch.no_grad(), rope_patch.disabled(), matmul_precision("highest"):
                plain_highest = exact_module(x, prefill)
            if difference(exact["prefill"], plain_highest):
                log(
                    f"  note: {model_type} {dtype_name(dtype)}: the unpatched forward under 'highest' differs "
                    f"from the elementwise fp32 formula: {difference(exact['prefill'], plain_highest)}"
                )
            for mode, scope in modes.items():
                if deadline.passed():
                    outcome.skip("numerics", f"deadline at {model_type} {mode}")
                    return
                module = cls(config).to(device)
                notes = []
                with torch.no_grad(), scope():
                    for name, pos in (("prefill", prefill), ("decode", decode), ("decode again", decode)):
                        got = module(x, pos)
                        key = "decode" if name.startswith("decode") else name
                        nan = nan_count(got)
                        problem = difference(exact[key], got)
                        if nan or problem:
                            outcome.fail(
                                f"numerics {model_type} {dtype_name(dtype)} {mode} {name}: "
                                f"{f'{nan} NaN; ' if nan else ''}{problem or ''}"
                            )
                    with rope_patch.disabled():
                        plain = module(x, prefill)
                    plain_diff = difference(exact["prefill"], plain)
                    notes.append(
                        f"unpatched here: {nan_count(plain)} NaN, {'differs from exact' if plain_diff else 'exact'}"
                    )
                answered = rope_patch.cache_info(module).answered
                log(
                    f"numerics {model_type} {dtype_name(dtype)} {mode}, positions < {count}: "
                    f"patched {'from tables' if answered else 'computed unpatched'}; " + "; ".join(notes)
                )
    line = f"numerics: deterministic and TF32-'high' checks done for positions < {count}"
    outcome.summary.append(line)
    outcome.row("checks", part="numerics", result=line)


def _formula(module, x, position_ids):
    """The exact values of a Llama-shaped forward, computed elementwise in
    fp32 (one rounded product per element, as the K=1 matmul of transformers
    4.x computes under "highest" precision, but without cuBLAS, so neither
    TF32 nor a deterministic-mode workspace can touch it)."""
    with torch.no_grad():
        freqs = position_ids[..., None].float() * module.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * module.attention_scaling
        sin = emb.sin() * module.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# --------------------------------------------------------------------------
# robustness


def part_robustness(device, deadline: Deadline, outcome: Outcome, args) -> None:
    """bf16 under deterministic algorithms: NaN in the unpatched and the
    patched rotary outputs, alone and inside a greedy generate. Both are
    reported whatever they are; only a NaN that the patched forward adds is
    a failure (it would not be bit-identical either)."""
    setting = (
        f"bf16, use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}"
    )
    if device.type != "cuda":
        log(f"robustness: on {device} ({setting}; cuBLAS is not involved on a CPU, so this only runs the code path)")
    count = 256 if args.cpu_smoke else NUMERICS_POSITIONS
    generator = torch.Generator().manual_seed(5)
    cases = {
        f"prefill 1x{count}": torch.arange(count)[None],
        "decode 8x1": torch.randint(0, count, (8, 1), generator=generator),
        "prefill 4x4096" if not args.cpu_smoke else "prefill 4x64": torch.arange(64 if args.cpu_smoke else 4096)[None]
        .expand(4, -1)
        .contiguous(),
    }
    for model_type in MODELS:
        if deadline.passed():
            outcome.skip("robustness", f"deadline before the {model_type} rotary")
            return
        module = build_rotary(model_type, device)
        with deterministic(), torch.no_grad():
            for case, on_cpu in cases.items():
                positions = on_cpu.to(device)
                x = torch.zeros(*positions.shape, 128, device=device, dtype=torch.bfloat16)
                with rope_patch.disabled():
                    plain = module(x, positions)
                for _ in range(2):  # first use, then from the table
                    patched = module(x, positions)
                _robust_row(outcome, f"{model_type} rotary alone", case, plain, patched, module, setting)
    _robust_generate(device, deadline, outcome, args, setting)


def _robust_row(outcome, what, case, plain, patched, module, setting):
    nan_plain, nan_patched = nan_count(plain), nan_count(patched)
    answered = rope_patch.cache_info(module).answered
    same = difference(plain, patched) is None
    log(
        f"ROBUSTNESS {what}, {case} ({setting}): unpatched NaN {nan_plain} of {numel(plain)}; "
        f"patched NaN {nan_patched} of {numel(patched)} "
        f"({'answered from tables' if answered else 'computed unpatched'}); "
        f"patched identical to unpatched: {same}"
    )
    outcome.row(
        "robustness",
        what=what,
        case=case,
        unpatched_nan=nan_plain,
        patched_nan=nan_patched,
        values=numel(plain),
        answered=answered,
        identical=same,
    )
    if nan_patched > nan_plain:
        outcome.fail(f"robustness {what} {case}: the patched forward has {nan_patched} NaN, unpatched {nan_plain}")


def _robust_generate(device, deadline, outcome, args, setting) -> None:
    """A short greedy generate of the Qwen3-0.6B-shaped model under
    deterministic mode, unpatched and patched: NaN in every rotary output
    (a forward hook), in the logits, and the tokens."""
    label, _model_type, _overrides = _generate_model_spec("qwen3-0.6b", args)
    if _full_size_on_cpu(device, f"robustness ({label} generate)", outcome, args):
        return
    if deadline.left() < (2 if args.cpu_smoke else 8):
        outcome.skip("robustness", f"too little time left for the {label} generate")
        return
    model = _generate_model("qwen3-0.6b", device, args)
    rotary = model.model.rotary_emb
    prompt = _prompt(model, device)
    new_tokens = 4 if args.cpu_smoke else 16
    seen = {"nan": 0, "values": 0}

    def hook(module, inputs, output):
        seen["nan"] += nan_count(output)
        seen["values"] += numel(output)

    handle = rotary.register_forward_hook(hook)
    results = {}
    try:
        for variant in ("unpatched", "patched"):
            seen.update(nan=0, values=0)
            scope = gen.unpatched(model) if variant == "unpatched" else contextlib.nullcontext()
            try:
                with deterministic(), torch.no_grad(), scope:
                    out = gen.generate(model, prompt, new_tokens, output_logits=True, return_dict_in_generate=True)
            except Exception as error:  # noqa: BLE001 - reported: some kernels have no deterministic form
                results[variant] = None
                log(
                    f"ROBUSTNESS {label} generate, {variant} ({setting}): "
                    f"raised {type(error).__name__}: {str(error)[:200]}"
                )
                continue
            logits_nan = sum(nan_count(step) for step in out.logits)
            results[variant] = (out.sequences, dict(seen), logits_nan)
    finally:
        handle.remove()
    for variant, result in results.items():
        if result is not None:
            log(
                f"ROBUSTNESS {label} generate {new_tokens} tokens, {variant} ({setting}): rotary outputs NaN "
                f"{result[1]['nan']} of {result[1]['values']}; logits NaN {result[2]}"
            )
    if all(results.get(v) is not None for v in ("unpatched", "patched")):
        (tokens_u, seen_u, logits_u), (tokens_p, seen_p, logits_p) = results["unpatched"], results["patched"]
        same = torch.equal(tokens_u, tokens_p)
        log(f"ROBUSTNESS {label} generate: tokens identical: {same}")
        outcome.row(
            "robustness",
            what=f"{label}, greedy generate {new_tokens} tokens",
            case="NaN in rotary outputs (in logits)",
            unpatched_nan=f"{seen_u['nan']} ({logits_u})",
            patched_nan=f"{seen_p['nan']} ({logits_p})",
            values=seen_u["values"],
            answered=rope_patch.cache_info(rotary).answered,
            identical=same,
        )
        if seen_p["nan"] > seen_u["nan"]:
            outcome.fail(f"robustness {label} generate: the patched rotary has NaN the unpatched one has not")


# --------------------------------------------------------------------------
# generate

_MODELS_BUILT: dict = {}


def _generate_model_spec(name: str, args):
    """(label, benchmark model type, config overrides) of GENERATE_MODELS[name]; shrunk under --cpu-smoke."""
    label, model_type, overrides = GENERATE_MODELS[name]
    if args.cpu_smoke:
        small = SMOKE_OVERRIDES
        label = f"{label.split(',')[0]} (smoke: {small['num_hidden_layers']} layers, hidden {small['hidden_size']})"
        return label, model_type, {**overrides, **small}
    return label, model_type, overrides


def _generate_model(name: str, device, args):
    """The random-weight bf16 model ``name`` of GENERATE_MODELS, built once."""
    if name not in _MODELS_BUILT:
        label, model_type, overrides = _generate_model_spec(name, args)
        start = time.perf_counter()
        model = gen.build_model(overrides, dtype=torch.bfloat16, device=device, model_type=model_type)
        parameters = sum(p.numel() for p in model.parameters())
        log(
            f"built {label}: {parameters / 1e6:.0f}M parameters, bf16, on {device} "
            f"in {time.perf_counter() - start:.1f} s"
        )
        _MODELS_BUILT[name] = model
    return _MODELS_BUILT[name]


def _prompt(model, device):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, model.config.vocab_size, (1, GENERATE_PROMPT), generator=generator).to(device)


@contextlib.contextmanager
def static_compiled(model, backend: str, device):
    """``model`` with a static cache and ``model.forward`` compiled for the
    block (generate's own auto-compile off, so exactly one compiled forward
    is in play); restored afterwards."""
    import torch._dynamo

    config = model.generation_config
    before = (config.cache_implementation, getattr(config, "disable_compile", False))
    options = {"fullgraph": False, "dynamic": False, "backend": backend}
    if backend == "inductor" and device.type == "cuda":
        options["mode"] = "reduce-overhead"  # CUDA graphs, as transformers' own CompileConfig
    torch._dynamo.reset()
    config.cache_implementation = "static"
    config.disable_compile = True
    model.forward = torch.compile(model.forward, **options)
    try:
        yield options
    finally:
        del model.forward  # the class's forward again
        config.cache_implementation, config.disable_compile = before
        torch._dynamo.reset()


def _full_size_on_cpu(device, part: str, outcome: Outcome, args) -> bool:
    """Skip (with the reason) the full-size models off CUDA unless --cpu-smoke shrinks them."""
    if device.type == "cuda" or args.cpu_smoke:
        return False
    reason = "no CUDA device: the full-size models are for a GPU (--cpu-smoke runs shrunk ones on CPU)"
    outcome.skip(part, reason, incomplete=not args.allow_cpu_skips)
    return True


def part_generate(device, deadline: Deadline, outcome: Outcome, args) -> None:
    if _full_size_on_cpu(device, "generate", outcome, args):
        return
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    names = [n.strip() for n in args.generate_models.split(",") if n.strip()]
    modes = [m.strip() for m in args.generate_modes.split(",") if m.strip()]
    unknown = [n for n in names if n not in GENERATE_MODELS] + [m for m in modes if m not in GENERATE_MODES]
    if unknown:
        outcome.skip("generate", f"unknown models or modes {unknown}")
        return
    new_tokens = 8 if args.cpu_smoke else 32
    # Eager modes first (cheap), then the compiles, the fewer layers the sooner.
    order = [(n, m) for m in modes if m != "compile" for n in names]
    if "compile" in modes:
        layers = {n: _generate_model_spec(n, args)[2]["num_hidden_layers"] for n in names}
        order += [(n, "compile") for n in sorted(names, key=layers.get)]
    for name, mode in order:
        label, _model_type, overrides = _generate_model_spec(name, args)
        where = f"{label}, {GENERATE_MODES[mode]}"
        if mode == "compile":
            need = 5.0 if args.cpu_smoke else COMPILE_SECONDS[0] * overrides["num_hidden_layers"] + COMPILE_SECONDS[1]
        else:
            need = 2.0 if args.cpu_smoke else 10.0
        if deadline.left() < need:
            outcome.skip("generate", f"{where}: {deadline.left():.0f} s left, needs about {need:.0f} s")
            continue
        try:
            _generate_one(name, mode, device, backend, new_tokens, outcome, args, where)
        except Exception as error:  # noqa: BLE001 - one mode must not hide the others
            log(traceback.format_exc())
            outcome.skip("generate", f"{where}: raised {type(error).__name__}: {str(error)[:200]}")
    _MODELS_BUILT.clear()
    free_memory(device)


def _generate_one(name, mode, device, backend, new_tokens, outcome, args, where) -> None:
    model = _generate_model(name, device, args)
    prompt = _prompt(model, device)
    runs = 2 if args.cpu_smoke else (4 if mode == "compile" else 3)
    kwargs = {"sync_free": True} if mode == "sync_free" else {}
    scopes = {"unpatched": gen.unpatched, "patched": lambda _: contextlib.nullcontext()}
    compiled = static_compiled(model, backend, device) if mode == "compile" else contextlib.nullcontext(None)
    with repatched(**kwargs), torch.no_grad(), compiled as options:
        start = time.perf_counter()
        times, identical = gen.alternating_runs(model, prompt, new_tokens, runs, scopes, device)
        warm_up_s = time.perf_counter() - start - sum(sum(values) for values in times.values())
        answered = rope_patch.cache_info(model.model.rotary_emb).answered
    per_s = {variant: new_tokens / statistics.median(values) for variant, values in times.items()}
    ratio = per_s["patched"] / per_s["unpatched"]
    detail = f"compile {options}" if options else "eager"
    log(
        f"GENERATE {where}: unpatched {per_s['unpatched']:.1f} tok/s, patched {per_s['patched']:.1f} tok/s "
        f"({ratio:.3f}x); tokens identical: {identical}; {new_tokens} new tokens x {runs} runs each, median; "
        f"first round (warm-up{', compile' if options else ''}) {warm_up_s:.1f} s; rotary answered from tables "
        f"after the runs: {answered}{' (under torch.compile the patch steps aside)' if options else ''}; {detail}"
    )
    outcome.row(
        "generate",
        model=_generate_model_spec(name, args)[0],
        mode=GENERATE_MODES[mode],
        unpatched_tok_s=per_s["unpatched"],
        patched_tok_s=per_s["patched"],
        ratio=ratio,
        identical=identical,
        runs=f"{new_tokens} x {runs}",
        warm_up_s=warm_up_s,
    )
    outcome.summary.append(f"generate {where}: {ratio:.3f}x ({per_s['unpatched']:.1f} -> {per_s['patched']:.1f} tok/s)")
    if not identical:
        outcome.fail(f"generate {where}: patched tokens differ from unpatched")


# --------------------------------------------------------------------------
# summary tables

TABLES = {
    "generate": (
        "Greedy generate, bf16, batch 1, prompt 16 tokens (median tokens/s)",
        [
            "transformers",
            "model",
            "mode",
            "tokens x runs",
            "unpatched tok/s",
            "patched tok/s",
            "patched/unpatched",
            "tokens identical",
            "warm-up s",
        ],
        lambda r: [
            r["transformers"],
            r["model"],
            r["mode"],
            r["runs"],
            f"{r['unpatched_tok_s']:.1f}",
            f"{r['patched_tok_s']:.1f}",
            f"**{r['ratio']:.3f}x**",
            _yes(r["identical"]),
            f"{r['warm_up_s']:.1f}",
        ],
    ),
    "latency": (
        "Per-call rotary latency, bf16, microseconds (median of alternating blocks)",
        ["transformers", "model", "mode", "shape", "unpatched us", "patched us", "floor us", "speedup"],
        lambda r: [
            r["transformers"],
            r["model"],
            r["mode"],
            r["shape"],
            f"{r['unpatched_us']:.1f}",
            f"{r['patched_us']:.1f}",
            _us(r["floor_us"]),
            f"**{r['speedup']:.2f}x**",
        ],
    ),
    "bounds": (
        "The exact bound check: microseconds per reading of the positions' extent (median)",
        ["transformers", "shape", "way", "us", "vs stack + tolist"],
        lambda r: [r["transformers"], r["shape"], r["way"], f"{r['us']:.2f}", f"{r['ratio']:.2f}x"],
    ),
    "robustness": (
        "bf16 under use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8: NaN counts",
        [
            "transformers",
            "what",
            "case",
            "unpatched NaN",
            "patched NaN",
            "values",
            "patched from tables",
            "patched == unpatched",
        ],
        lambda r: [
            r["transformers"],
            r["what"],
            r["case"],
            r["unpatched_nan"],
            r["patched_nan"],
            r["values"],
            _yes(r["answered"]),
            _yes(r["identical"]),
        ],
    ),
    "checks": (
        "Other checks",
        ["transformers", "part", "result"],
        lambda r: [r["transformers"], r["part"], r["result"]],
    ),
}


def _yes(value) -> str:
    return "yes" if value else "**no**"


def summary_markdown(rows: list[dict]) -> list[str]:
    lines = []
    for table, (title, header, cells) in TABLES.items():
        selected = [r for r in rows if r["table"] == table]
        if not selected:
            continue
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in selected]
        lines.append("")
    return lines


def print_summary(path: str) -> int:
    try:
        with open(path) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except OSError as error:
        log(f"no summary: {error}")
        return 1
    for line in summary_markdown(rows):
        log(line)
    return 0


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rope_patch GPU check (see the module docstring)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for all parts together")
    parser.add_argument("--limit", type=int, default=0, help="identity: check only the first N classes")
    parser.add_argument("--identity-pattern", default=None, help="identity: only model types / classes matching this")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and positions")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, tiny shapes and models, every part (CUDA-only steps skipped with a reason): seconds",
    )
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager on CPU")
    parser.add_argument("--generate-models", default=",".join(GENERATE_MODELS), help="generate: comma list")
    parser.add_argument("--generate-modes", default=",".join(GENERATE_MODES), help="generate: comma list")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, where waking idle OpenMP workers on a shared "
        "machine can cost milliseconds per op; unchanged on CUDA)",
    )
    parser.add_argument(
        "--allow-cpu-skips", action="store_true", help="on CPU, a skipped CUDA-only part is not 'incomplete'"
    )
    parser.add_argument("--summary-json", help="append this run's table rows (JSON lines) to this file")
    parser.add_argument("--print-summary", metavar="FILE", help="print the tables of the rows in FILE and exit")
    args = parser.parse_args(argv)
    if args.print_summary:
        return print_summary(args.print_summary)
    if args.cpu_smoke:
        args.device, args.allow_cpu_skips = "cpu", True
        args.identity_pattern = args.identity_pattern or "qwen2_vl"
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.allow_cpu_skips = args.allow_cpu_skips or device.type == "cpu"
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log(f"SKIPPED every part: --device {args.device} but torch {torch.__version__} sees no CUDA device")
        return 3
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")

    machine = machine_description()
    log("== rope_patch gpu_check: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    log(
        f"== device {device}; parts {','.join(parts)}; budget {args.budget:.0f} s; "
        f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')} for the whole process"
        + ("; --cpu-smoke (tiny shapes: a test of the code paths, not a measurement)" if args.cpu_smoke else "")
    )
    if device.type != "cuda":
        log(
            f"== no CUDA device in use ({'available' if torch.cuda.is_available() else 'torch sees none'}): "
            "CUDA-only steps are skipped"
        )
    if not rope_patch.patch():
        log("FAIL rope_patch.patch() did not patch (ROPE_PATCH_DISABLE set or unsupported versions)")
        return 1
    outcome = Outcome(machine["transformers"], args.summary_json)
    runners = {
        "identity": part_identity,
        "latency": part_latency,
        "compile": part_compile,
        "graph": part_graph,
        "numerics": part_numerics,
        "robustness": part_robustness,
        "generate": part_generate,
    }
    run_start = time.monotonic()
    for position, part in enumerate(parts):
        left = args.budget - (time.monotonic() - run_start)
        remaining_share = sum(SHARES[p] for p in parts[position:])
        seconds = max(5.0, left * SHARES[part] / remaining_share)
        log(f"\n== {part} (deadline {seconds:.0f} s)")
        start = time.monotonic()
        try:
            runners[part](device, Deadline(seconds), outcome, args)
        except Exception:  # noqa: BLE001 - one broken part must not hide the others
            log(traceback.format_exc())
            outcome.incomplete.append(f"{part}: raised (traceback above)")
        log(f"== {part} done in {time.monotonic() - start:.1f} s")
        if "generate" not in parts[position + 1 :]:
            _MODELS_BUILT.clear()  # robustness leaves its model to generate only
        free_memory(device)
    log("\n== summary (transformers " + machine["transformers"] + f", {device})")
    for line in outcome.summary:
        log(f"  {line}")
    for line in outcome.incomplete:
        log(f"  INCOMPLETE {line}")
    log(f"  bit-identity failures: {len(outcome.failures)}")
    for line in outcome.failures[:50]:
        log(f"    {line}")
    log("\n== tables (markdown)\n")
    for line in summary_markdown(outcome.rows):
        log(line)
    status = outcome.status()
    log(f"== exit status {status} ({'FAILED' if status == 1 else 'incomplete' if status == 3 else 'ok'})")
    return status


if __name__ == "__main__":
    sys.exit(main())
