"""Per-call latency of rotaries whose rope type changes state between
calls: longrope (Phi-3-mini-128k-shaped: head_dim 96, original maximum
4096, maximum 131072) and dynamic NTK (Llama-shaped: head_dim 128, original
maximum 4096, factor 2), each in both its states.

transformers' ``dynamic_rope_update`` updates the module's frequencies per
call from the call's largest position. The patched forward answers from a
table where that update would change nothing: longrope's short set
(positions below the original maximum) and its long set (calls whose
largest position is at or past it; one reading of the positions' extent),
dynamic while unscaled. A scaled dynamic state is new at every growth: no
table holds it, and the call must cost what the unpatched one does.

One thread, alternating blocks (thread CPU time, medians), the forward
function as a model calls it, unpatched (the class's original function, on
a twin module, so that each keeps its own state) and patched, decode and
prefill at positions starting at 1000 (short set, unscaled) and 8000 (long
set, scaled):

    python benchmarks/bench_rope_types.py [--dtype fp32,bf16] [--rounds 21]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import rope_patch  # noqa: E402
from rope_patch.diagnostics import latency  # noqa: E402
from rope_patch.forward import original_of  # noqa: E402
from rope_patch.identity import difference  # noqa: E402

ORIGINAL = 4096
SHAPES = ((1, 1), (8, 1), (1, 512))


def longrope():
    """A fresh Phi-3-mini-128k-shaped longrope rotary (48 factors per set)."""
    import transformers
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    half = 96 // 2
    config = transformers.Phi3Config(
        hidden_size=96 * 32,
        num_attention_heads=32,
        max_position_embeddings=131072,
        original_max_position_embeddings=ORIGINAL,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.02 * i for i in range(half)],
            "long_factor": [1.5 + 0.5 * i for i in range(half)],
        },
    )
    return Phi3RotaryEmbedding(config)


def dynamic():
    """A fresh Llama-shaped dynamic NTK rotary (original maximum 4096)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        head_dim=128,
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=ORIGINAL,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    return LlamaRotaryEmbedding(config)


#: label -> (rotary factory, head_dim, first position)
CASES = {
    "longrope short set": (longrope, 96, 1000),
    "longrope long set": (longrope, 96, 8000),
    "dynamic unscaled": (dynamic, 128, 1000),
    "dynamic scaled": (dynamic, 128, 8000),
}


def measure(dtype, rounds: int) -> list[tuple]:
    """(case, shape, unpatched us, patched us) per case and shape: medians of
    ``rounds`` alternating blocks (rope_patch.diagnostics.latency.alternate)."""
    rows = []
    for name, (rotary, head_dim, start) in CASES.items():
        for batch, seq in SHAPES:
            module, twin = rotary(), rotary()
            forward = type(module).forward
            original = original_of(forward)
            positions = (torch.arange(seq) + start).expand(batch, seq).contiguous()
            x = torch.zeros(batch, seq, head_dim, dtype=dtype)
            with torch.no_grad():
                for _ in range(3):  # build, verify, answer
                    problem = difference(original(twin, x, positions), forward(module, x, positions))
                    assert problem is None, problem
                variants = {"unpatched": (original, (twin, x, positions)), "patched": (forward, (module, x, positions))}
                times = latency.alternate(variants, "cpu", rounds=rounds)
            rows.append(
                (name, f"{batch}x{seq}", statistics.median(times["unpatched"]), statistics.median(times["patched"]))
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(1)
    assert rope_patch.patch()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, one thread, "
        f"{args.rounds} alternating blocks, microseconds per call (median)"
    )
    print("| dtype | case | shape | unpatched us | patched us | speedup |")
    print("|---|---|---|---|---|---|")
    for name in args.dtype.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        for case, shape, plain, patched in measure(dtype, args.rounds):
            print(f"| {name} | {case} | {shape} | {plain:.1f} | {patched:.1f} | **{plain / patched:.2f}x** |")


if __name__ == "__main__":
    main()
