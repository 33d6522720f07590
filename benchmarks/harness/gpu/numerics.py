"""GPU check, part ``numerics``: under deterministic algorithms and TF32
``"high"`` precision, patched outputs up to 32k positions have no NaN and
equal the exact values."""

from __future__ import annotations

import torch

import rope_patch
from harness.common import MODELS, dtype_name, model_config, rotary_class
from harness.gpu.run import NUMERICS_POSITIONS, Deadline, Outcome, deterministic, log, matmul_precision, nan_count
from rope_patch.identity import difference


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
    outcome.check("numerics", f"numerics: deterministic and TF32-'high' checks done for positions < {count}")


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
