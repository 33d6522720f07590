"""Per-call latency of a longrope rotary (Phi-3-mini-128k-shaped: head_dim
96, original maximum 4096, maximum 131072), on both frequency sets.

Longrope picks its short or long frequency set per call from the call's
largest position (transformers' ``dynamic_rope_update``). The patched
forward answers the short set from its table (positions below the original
maximum) and the long set from its own table when the call's largest
position is at or past the original maximum (one reading of the positions'
extent); other calls run transformers' update first. This times, one
thread, alternating blocks (thread CPU time, medians), the forward function
as a model calls it, unpatched (the class's original function, on a twin
module, so each keeps its own state) and patched, for decode and prefill
at position 1000 (short set) and 8000 (long set):

    python benchmarks/bench_longrope.py [--dtype fp32,bf16] [--rounds 21]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import rope_patch  # noqa: E402
from rope_patch.forward import original_of  # noqa: E402
from rope_patch.identity import difference  # noqa: E402

HEAD_DIM = 96
ORIGINAL = 4096
SHAPES = ((1, 1), (8, 1), (1, 512))
STARTS = {"short set": 1000, "long set": 8000}


def rotary():
    """A fresh Phi-3-mini-128k-shaped longrope rotary (factors as that model's
    shape: 48 per set)."""
    import transformers
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    half = HEAD_DIM // 2
    config = transformers.Phi3Config(
        hidden_size=HEAD_DIM * 32,
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


def block(function, calls: int) -> float:
    """Microseconds per call of ``function``, thread CPU time."""
    start = time.thread_time_ns()
    for _ in range(calls):
        function()
    return (time.thread_time_ns() - start) / calls / 1e3


def measure(dtype, rounds: int, calls: int = 300) -> list[tuple]:
    """(set, shape, unpatched us, patched us) per set and shape."""
    rows = []
    for name, start in STARTS.items():
        for batch, seq in SHAPES:
            module, twin = rotary(), rotary()
            forward = type(module).forward
            original = original_of(forward)
            positions = (torch.arange(seq) + start).expand(batch, seq).contiguous()
            x = torch.zeros(batch, seq, HEAD_DIM, dtype=dtype)
            with torch.no_grad():
                for _ in range(3):  # build, verify, answer
                    problem = difference(original(twin, x, positions), forward(module, x, positions))
                    assert problem is None, problem
                variants = {"unpatched": lambda: original(twin, x, positions), "patched": lambda: forward(module, x, positions)}
                times = {key: [] for key in variants}
                for _ in range(rounds):
                    for key, function in variants.items():
                        times[key].append(block(function, calls if seq == 1 else calls // 10))
            rows.append((name, f"{batch}x{seq}", statistics.median(times["unpatched"]), statistics.median(times["patched"])))
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
    print("| dtype | set | shape | unpatched us | patched us | speedup |")
    print("|---|---|---|---|---|---|")
    for name in args.dtype.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        for frequency_set, shape, plain, patched in measure(dtype, args.rounds):
            print(f"| {name} | {frequency_set} | {shape} | {plain:.1f} | {patched:.1f} | **{plain / patched:.2f}x** |")


if __name__ == "__main__":
    main()
