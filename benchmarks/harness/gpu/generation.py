"""GPU check, part ``generate``: greedy generate tokens/s, patched vs
unpatched, on random-weight models shaped like Qwen3-0.6B and Llama-3-8B,
eager, sync-free and static-cache compiled."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback

import torch

import rope_patch
from harness import generate as gen
from harness.gpu.run import (
    COMPILE_SECONDS,
    GENERATE_MODELS,
    GENERATE_MODES,
    GENERATE_PROMPT,
    SMOKE_OVERRIDES,
    Deadline,
    Outcome,
    free_memory,
    log,
    repatched,
)

MODELS_BUILT: dict = {}


def generate_model_spec(name: str, args):
    """(label, benchmark model type, config overrides) of GENERATE_MODELS[name]; shrunk under --cpu-smoke."""
    label, model_type, overrides = GENERATE_MODELS[name]
    if args.cpu_smoke:
        small = SMOKE_OVERRIDES
        label = f"{label.split(',')[0]} (smoke: {small['num_hidden_layers']} layers, hidden {small['hidden_size']})"
        return label, model_type, {**overrides, **small}
    return label, model_type, overrides


def generate_model(name: str, device, args):
    """The random-weight bf16 model ``name`` of GENERATE_MODELS, built once."""
    if name not in MODELS_BUILT:
        label, model_type, overrides = generate_model_spec(name, args)
        start = time.perf_counter()
        model = gen.build_model(overrides, dtype=torch.bfloat16, device=device, model_type=model_type)
        parameters = sum(p.numel() for p in model.parameters())
        log(
            f"built {label}: {parameters / 1e6:.0f}M parameters, bf16, on {device} "
            f"in {time.perf_counter() - start:.1f} s"
        )
        MODELS_BUILT[name] = model
    return MODELS_BUILT[name]


def prompt_ids(model, device):
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


def full_size_on_cpu(device, part: str, outcome: Outcome, args) -> bool:
    """Skip (with the reason) the full-size models off CUDA unless --cpu-smoke shrinks them."""
    if device.type == "cuda" or args.cpu_smoke:
        return False
    reason = "no CUDA device: the full-size models are for a GPU (--cpu-smoke runs shrunk ones on CPU)"
    outcome.skip(part, reason, incomplete=not args.allow_cpu_skips)
    return True


def part_generate(device, deadline: Deadline, outcome: Outcome, args) -> None:
    if full_size_on_cpu(device, "generate", outcome, args):
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
        layers = {n: generate_model_spec(n, args)[2]["num_hidden_layers"] for n in names}
        order += [(n, "compile") for n in sorted(names, key=layers.get)]
    for name, mode in order:
        label, _model_type, overrides = generate_model_spec(name, args)
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
    MODELS_BUILT.clear()
    free_memory(device)


def _generate_one(name, mode, device, backend, new_tokens, outcome, args, where) -> None:
    model = generate_model(name, device, args)
    prompt = prompt_ids(model, device)
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
        model=generate_model_spec(name, args)[0],
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
