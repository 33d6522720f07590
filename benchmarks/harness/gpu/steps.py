"""GPU check, parts ``compile`` and ``graph``: a small Qwen3 step under
``torch.compile(fullgraph=True)``, and captured in a CUDA graph, patched vs
unpatched: time and outputs. :func:`step_model`, :func:`step_inputs` and
:func:`time_steps` are the step benchmarks/bench_compile.py times too."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

import rope_patch
from harness import generate as gen
from harness.gpu.run import STEP_MODEL, Deadline, Outcome, log, repatched, sync, unpatched_scope
from rope_patch.identity import difference


def step_model(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return gen.build_model(STEP_MODEL, dtype=dtype, device=device)


def step_inputs(device, seq: int = 1):
    input_ids = torch.randint(1, gen.VOCAB, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    positions = (1000 + torch.arange(seq))[None].to(device)
    return input_ids, positions


def time_steps(function, device, deadline: Deadline | None = None, rounds: int = 30, calls: int = 20) -> float:
    """Median microseconds per call over ``rounds`` blocks of ``calls`` (fewer
    once ``deadline`` has passed)."""
    samples = []
    for _ in range(rounds):
        if deadline is not None and deadline.passed() and samples:
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
    model = step_model(device)
    input_ids, positions = step_inputs(device)
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
                step_us = time_steps(step, device, deadline, rounds=rounds)
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
        outcome.check("compile", line)
        if not same:
            outcome.fail("compile: logits of the patched and unpatched compiled models differ")


def part_graph(device, deadline: Deadline, outcome: Outcome, args) -> None:
    """Capture (a) the rotary module alone and (b) a whole one-token model
    step, unpatched, patched with the exact bound check and sync-free; replay
    at two positions and compare with eager unpatched outputs."""
    if device.type != "cuda":
        outcome.skip("graph", "CUDA graphs need a CUDA device", incomplete=not args.allow_cpu_skips)
        return
    model = step_model(device)
    rotary = model.model.rotary_emb
    input_ids, positions = step_inputs(device)
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
                times[unit, mode] = time_steps(graph.replay, device, deadline, rounds=20, calls=50)
                log(f"graph {unit} {mode}: replay {times[unit, mode]:.1f} us; rotary tables held (positions): {held}")
                del graph, out
        unpatched_captures = (unit, "unpatched") in captured and captured[unit, "unpatched"] is None
        if unpatched_captures and any(captured.get((unit, m)) for m in modes if m != "unpatched"):
            outcome.fail(f"graph {unit}: the patched forward breaks a capture that works unpatched")
        elif captured.get((unit, "unpatched")):
            outcome.skip("graph", f"{unit} does not capture even unpatched here")
    for unit in units:
        line = f"graph replay, {unit}: " + ", ".join(f"{m} {t:.1f} us" for (u, m), t in times.items() if u == unit)
        outcome.check("graph", line)
