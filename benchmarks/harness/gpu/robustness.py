"""GPU check, part ``robustness``: NaN counts of the unpatched and the
patched rotary in bf16 under ``use_deterministic_algorithms(True)``, alone
and inside a greedy generate."""

from __future__ import annotations

import contextlib
import os

import torch

import rope_patch
from harness import generate as gen
from harness.common import MODELS, build_rotary
from harness.gpu.generation import full_size_on_cpu, generate_model, generate_model_spec, prompt_ids
from harness.gpu.run import NUMERICS_POSITIONS, Deadline, Outcome, deterministic, log, nan_count, numel
from rope_patch.identity import difference


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
    label, _model_type, _overrides = generate_model_spec("qwen3-0.6b", args)
    if full_size_on_cpu(device, f"robustness ({label} generate)", outcome, args):
        return
    if deadline.left() < (2 if args.cpu_smoke else 8):
        outcome.skip("robustness", f"too little time left for the {label} generate")
        return
    model = generate_model("qwen3-0.6b", device, args)
    rotary = model.model.rotary_emb
    prompt = prompt_ids(model, device)
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
