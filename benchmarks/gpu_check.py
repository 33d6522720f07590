"""GPU check of rope_patch: bit-identity on CUDA, latency, torch.compile,
CUDA graphs, deterministic / TF32 numerics. Run by ``benchmarks/gpu_check.sh``
(once per transformers version); runs on CPU too (``--device cpu``) as a dry
run of the logic.

Parts (``--parts``, comma list, default all):

identity  every rotary class the catalog can instantiate, verified with
          ``rope_patch.verify.verify_module`` in fp32, bf16 and fp16;
latency   per-call latency unpatched / patched / floor, default (exact bound
          check: one host sync) and ``sync_free=True``;
compile   a small Qwen3 under ``torch.compile(fullgraph=True)``, patch active
          vs not: step time and logits;
graph     the same model captured in a CUDA graph, patched (default and
          sync-free) vs unpatched: replay time and logits (CUDA only);
numerics  under ``torch.use_deterministic_algorithms(True)`` and under
          ``set_float32_matmul_precision("high")``: patched bf16/fp32 outputs
          for positions up to 32k have no NaN and equal the exact values (the
          forward's formula computed elementwise in fp32; the unpatched
          forward under "highest" precision is checked against it too).

Every part has a deadline (``--budget`` seconds for the whole run, split
over the parts); a part that runs out stops and is reported INCOMPLETE.

Exit status: 1 if any bit-identity check failed; else 3 if any part was
skipped, errored or ran out of time; else 0.
"""

from __future__ import annotations

import os

# Must be set before cuBLAS is initialised (the deterministic part needs it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import contextlib
import gc
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch

import rope_patch
from rope_patch import bench, bench_generate, tables
from rope_patch.identity import difference

PARTS = ("identity", "latency", "compile", "graph", "numerics")
#: Share of the budget each part may use (the rest is slack for start-up).
SHARES = {"identity": 0.40, "latency": 0.12, "compile": 0.32, "graph": 0.08, "numerics": 0.08}
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


def log(line: str = "") -> None:
    print(line, flush=True)


class Outcome:
    """What the run found: bit-identity failures and incomplete parts."""

    def __init__(self):
        self.failures: list[str] = []
        self.incomplete: list[str] = []
        self.summary: list[str] = []

    def fail(self, line: str) -> None:
        self.failures.append(line)
        log(f"FAIL {line}")

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


@contextlib.contextmanager
def repatched(**kwargs):
    """Patched with ``kwargs`` for the block (tables of earlier modules are
    forgotten by unpatch); patched with defaults again afterwards."""
    if rope_patch.is_patched():
        rope_patch.unpatch()
    rope_patch.patch(**kwargs)
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


# --------------------------------------------------------------------------
# identity


def part_identity(device, deadline: Deadline, outcome: Outcome, args) -> None:
    from rope_patch import catalog, verify

    start = time.monotonic()
    rotaries = catalog.iter_catalog()
    log(f"catalog: {len(rotaries)} rotary classes ({time.monotonic() - start:.1f} s to import the modeling modules)")
    if args.limit:
        rotaries = rotaries[: args.limit]
    counts = {"verified": 0, "cached": 0, "unsupported": 0, "no-instance": 0, "fallback": 0}
    fallbacks: dict[str, str] = {}
    for index, rotary in enumerate(rotaries):
        if deadline.passed():
            outcome.incomplete.append(f"identity: deadline after {index} of {len(rotaries)} classes")
            log(f"INCOMPLETE identity: deadline after {index} of {len(rotaries)} classes")
            break
        label = f"{rotary.model_type}.{rotary.name}"
        if rotary.unsupported:
            counts["unsupported"] += 1
            continue
        try:
            instance = catalog.default_instance(rotary, device)
        except Exception as error:  # noqa: BLE001 - reported, not a bit-identity failure
            counts["no-instance"] += 1
            log(f"  no instance: {label}: {str(error)[:160]}")
            continue
        layer_types = catalog.layer_types_of(instance)
        cached_all = True
        for dtype in DTYPES:
            try:
                verdict = verify.verify_module(instance, layer_types, device=device, dtype=dtype)
            except Exception as error:  # noqa: BLE001 - the verifier itself broke: a failure
                outcome.fail(f"identity {label} {dtype}: verify raised {error!r}")
                cached_all = False
                continue
            for problem in verdict.problems:
                outcome.fail(f"identity {label} {bench.dtype_name(dtype)}: {problem}")
            if not verdict.cached:
                cached_all = False
                fallbacks.setdefault(label, verdict.fallback or "not cached")
        counts["verified"] += 1
        counts["cached" if cached_all else "fallback"] += 1
        del instance
        if index % 20 == 19:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for label, reason in sorted(fallbacks.items()):
        log(f"  computed unpatched (not a failure): {label}: {reason[:160]}")
    line = (
        f"identity on {device}: {counts['verified']} classes verified in fp32/bf16/fp16 "
        f"({counts['cached']} answered from tables, {counts['fallback']} fall back), "
        f"{counts['unsupported']} unsupported by design, {counts['no-instance']} not instantiable; "
        f"{len([f for f in outcome.failures if f.startswith('identity')])} mismatches"
    )
    outcome.summary.append(line)
    log(line)


# --------------------------------------------------------------------------
# latency


def part_latency(device, deadline: Deadline, outcome: Outcome, args) -> None:
    shapes = ((1, 1), (8, 1), (1, 512), (4, 4096)) if not args.quick else ((1, 1), (1, 512))
    modes = {"exact bound check": {}, "sync_free": {"sync_free": True}}
    per_shape = max(deadline.left(), 1) / (len(modes) * len(shapes) * 2)
    budget_s = min(bench.SHAPE_BUDGET_SECONDS, max(per_shape * 0.6, 0.2))
    rows = []
    try:
        for model_type in ("qwen3", "llama3"):
            for mode, kwargs in modes.items():
                if deadline.passed():
                    outcome.incomplete.append(f"latency: deadline before {model_type} {mode}")
                    return
                with repatched(**kwargs):
                    for row in bench.forward_latency(
                        model_type, device, torch.bfloat16, shapes, progress=log, budget_s=budget_s
                    ):
                        rows.append((mode, row))
    except AssertionError as error:
        outcome.fail(f"latency: {error}")
        return
    finally:
        _print_latency(rows)
    for mode, r in rows:
        if r.shape in ((1, 1), (4, 4096)):
            outcome.summary.append(
                f"latency {r.model_type} bf16 {r.shape[0]}x{r.shape[1]} {mode}: unpatched {r.unpatched_us:.1f} us, "
                f"patched {r.patched_us:.1f} us ({r.speedup:.2f}x), floor {r.floor_us:.1f} us"
            )


def _print_latency(rows) -> None:
    if not rows:
        return
    log()
    log("| model | mode | shape | unpatched us | patched us | floor us | speedup | patched/floor | disabled() us |")
    log("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows:
        log(
            f"| {r.model_type} | {mode} | {r.shape[0]}x{r.shape[1]} | {r.unpatched_us:.1f} | {r.patched_us:.1f} | "
            f"{r.floor_us:.1f} | {r.speedup:.2f}x | {r.over_floor:.2f}x | {r.disabled_us:.1f} |"
        )
    log()


# --------------------------------------------------------------------------
# compile and graph


def _step_model(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return bench_generate.build_model(STEP_MODEL, dtype=dtype, device=device)


def _step_inputs(device, seq: int = 1):
    input_ids = torch.randint(1, bench_generate.VOCAB, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
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
    with torch.no_grad():
        for mode in ("unpatched", "patched"):
            if deadline.passed():
                outcome.incomplete.append(f"compile: deadline before the {mode} compile")
                log(f"INCOMPLETE compile: deadline before the {mode} compile")
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
                step_us = _time_steps(step, device, deadline)
            results[mode] = (logits.float().cpu(), compile_s, step_us)
            log(f"compile {mode}: first call {compile_s:.1f} s (compile), step {step_us:.1f} us ({backend}, fullgraph)")
    torch._dynamo.reset()
    if "patched" in errors and "unpatched" not in errors:
        outcome.fail(
            f"compile: the patched model fails under fullgraph compile, the unpatched one does not: {errors['patched']}"
        )
    elif errors:
        outcome.incomplete.append(
            f"compile: the unpatched model itself does not compile here: {errors.get('unpatched')}"
        )
    if len(results) == 2:
        same = torch.equal(results["patched"][0], results["unpatched"][0])
        line = (
            f"compile ({backend}, fullgraph=True, one-token step of a {STEP_MODEL['num_hidden_layers']}-layer Qwen3, "
            f"no cache): patched {results['patched'][2]:.1f} us vs unpatched {results['unpatched'][2]:.1f} us per step "
            f"({results['unpatched'][2] / results['patched'][2]:.3f}x); logits identical: {same}"
        )
        outcome.summary.append(line)
        log(line)
        if not same:
            outcome.fail("compile: logits of the patched and unpatched compiled models differ")


def part_graph(device, deadline: Deadline, outcome: Outcome, args) -> None:
    """Capture (a) the rotary module alone and (b) a whole one-token model
    step, unpatched, patched with the exact bound check and sync-free; replay
    at two positions and compare with eager unpatched outputs."""
    if device.type != "cuda":
        log("graph: skipped (CUDA graphs need a CUDA device)")
        if not args.allow_cpu_skips:
            outcome.incomplete.append("graph: no CUDA device")
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
                outcome.incomplete.append(f"graph: deadline before {unit} {mode}")
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
                state = tables.state_of(rotary)
                held = sorted(t.size for t in state.tables.values() if t is not None) if state else []
                times[unit, mode] = _time_steps(graph.replay, device, deadline, rounds=20, calls=50)
                log(f"graph {unit} {mode}: replay {times[unit, mode]:.1f} us; rotary tables held (positions): {held}")
                del graph, out
        unpatched_captures = (unit, "unpatched") in captured and captured[unit, "unpatched"] is None
        if unpatched_captures and any(captured.get((unit, m)) for m in modes if m != "unpatched"):
            outcome.fail(f"graph {unit}: the patched forward breaks a capture that works unpatched")
        elif captured.get((unit, "unpatched")):
            outcome.incomplete.append(f"graph {unit}: does not capture even unpatched here")
    for unit in units:
        line = f"graph replay, {unit}: " + ", ".join(f"{m} {t:.1f} us" for (u, m), t in times.items() if u == unit)
        outcome.summary.append(line)
        log(line)


# --------------------------------------------------------------------------
# numerics


def part_numerics(device, deadline: Deadline, outcome: Outcome, args) -> None:
    count = NUMERICS_POSITIONS if not args.quick else 4096
    prefill = torch.arange(count, device=device)[None]
    decode = torch.randint(0, count, (8, 1), generator=torch.Generator().manual_seed(3)).to(device)
    modes = {
        "deterministic": lambda: _deterministic(),
        "tf32 'high'": lambda: _precision("high"),
    }
    for model_type in ("qwen3", "llama3"):
        config = bench.rotary_config(model_type, max_position_embeddings=max(count, 40960))
        cls = bench.rotary_class(model_type)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.zeros(1, 1, 8, device=device, dtype=dtype)
            exact_module = cls(config).to(device)
            exact = {name: _formula(exact_module, x, pos) for name, pos in (("prefill", prefill), ("decode", decode))}
            with torch.no_grad(), rope_patch.disabled(), _precision("highest"):
                plain_highest = exact_module(x, prefill)
            if difference(exact["prefill"], plain_highest):
                log(
                    f"  note: {model_type} {bench.dtype_name(dtype)}: the unpatched forward under 'highest' differs "
                    f"from the elementwise fp32 formula: {difference(exact['prefill'], plain_highest)}"
                )
            for mode, scope in modes.items():
                if deadline.passed():
                    outcome.incomplete.append(f"numerics: deadline at {model_type} {mode}")
                    return
                module = cls(config).to(device)
                notes = []
                with torch.no_grad(), scope():
                    for name, pos in (("prefill", prefill), ("decode", decode), ("decode again", decode)):
                        got = module(x, pos)
                        key = "decode" if name.startswith("decode") else name
                        nan = any(bool(torch.isnan(t).any()) for t in got)
                        problem = difference(exact[key], got)
                        if nan or problem:
                            outcome.fail(
                                f"numerics {model_type} {bench.dtype_name(dtype)} {mode} {name}: "
                                f"{'NaN; ' if nan else ''}{problem or ''}"
                            )
                    with rope_patch.disabled():
                        plain = module(x, prefill)
                    plain_nan = sum(int(torch.isnan(t).sum()) for t in plain)
                    plain_diff = difference(exact["prefill"], plain)
                    notes.append(f"unpatched here: {plain_nan} NaN, {'differs from exact' if plain_diff else 'exact'}")
                state = tables.state_of(module)
                cached = bool(state and any(t is not None and t.verified for t in state.tables.values()))
                log(
                    f"numerics {model_type} {bench.dtype_name(dtype)} {mode}, positions < {count}: "
                    f"patched {'from tables' if cached else 'computed unpatched'}; " + "; ".join(notes)
                )
    outcome.summary.append(f"numerics: deterministic and TF32-'high' checks done for positions < {count}")


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


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _precision(value: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rope_patch GPU check (see the module docstring)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for all parts together")
    parser.add_argument("--limit", type=int, default=0, help="identity: check only the first N catalog classes")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and positions (dry runs)")
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager on CPU")
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
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if args.device == "auto" and device.type == "cpu":
        args.allow_cpu_skips = True
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")

    machine = bench.machine_description()
    log("== rope_patch gpu_check: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    log(f"== device {device}; parts {','.join(parts)}; budget {args.budget:.0f} s")
    if not rope_patch.patch():
        log("FAIL rope_patch.patch() did not patch (ROPE_PATCH_DISABLE set or unsupported versions)")
        return 1
    outcome = Outcome()
    runners = {
        "identity": part_identity,
        "latency": part_latency,
        "compile": part_compile,
        "graph": part_graph,
        "numerics": part_numerics,
    }
    total = sum(SHARES[p] for p in parts)
    run_start = time.monotonic()
    for position, part in enumerate(parts):
        # Unused time of earlier parts goes to later ones.
        left = args.budget - (time.monotonic() - run_start)
        remaining_share = sum(SHARES[p] for p in parts[position:])
        seconds = max(5.0, left * SHARES[part] / remaining_share) if total else left
        log(f"\n== {part} (deadline {seconds:.0f} s)")
        start = time.monotonic()
        try:
            runners[part](device, Deadline(seconds), outcome, args)
        except Exception:  # noqa: BLE001 - one broken part must not hide the others
            log(traceback.format_exc())
            outcome.incomplete.append(f"{part}: raised (traceback above)")
        log(f"== {part} done in {time.monotonic() - start:.1f} s")
    log("\n== summary (transformers " + machine["transformers"] + f", {device})")
    for line in outcome.summary:
        log(f"  {line}")
    for line in outcome.incomplete:
        log(f"  INCOMPLETE {line}")
    log(f"  bit-identity failures: {len(outcome.failures)}")
    for line in outcome.failures[:50]:
        log(f"    {line}")
    status = outcome.status()
    log(f"== exit status {status} ({'FAILED' if status == 1 else 'incomplete' if status == 3 else 'ok'})")
    return status


if __name__ == "__main__":
    sys.exit(main())
