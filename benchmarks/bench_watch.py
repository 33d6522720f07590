"""What watching the frequency state costs per call, and what watching
values (to see in-place ``.data`` edits) would add.

The fast path checks, per call, that every tensor the forward read is the
same object at the same address and version (rope_patch.cache.watch). An
in-place edit through ``.data`` (``inv_freq.data.mul_(2)``) bumps no
version counter: only comparing the values on every call could see it.
This times, on a Qwen3-shaped rotary (head_dim 128) at decode, in
alternating blocks on one thread (thread CPU time, median of the blocks):

- *patched*: the installed forward (fast path, table hit);
- *patched + value check*: the same plus the comparison a value watch would
  make (``torch.equal`` of inv_freq's bits with a snapshot);
- *watch only*: ``Watch.holds()`` alone; *floor*: the two bare gathers.

    python benchmarks/bench_watch.py [--dtype fp32,bf16] [--rounds 41]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import rope_patch
from rope_patch import cache
from rope_patch.diagnostics import latency
from rope_patch.identity import bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    import transformers
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    torch.set_num_threads(1)
    assert rope_patch.patch()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, one thread, "
        f"{args.rounds} alternating blocks, microseconds per call (median)"
    )
    print("DTYPE  PATCHED  +VALUE CHECK  ADDED   WATCH ONLY  FLOOR")
    for name in args.dtype.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        module = Qwen3RotaryEmbedding(transformers.Qwen3Config(head_dim=128, max_position_embeddings=40960))
        x, positions = torch.zeros(1, 1, 128, dtype=dtype), torch.tensor([[1000]])
        forward = type(module).forward
        with torch.no_grad():
            for _ in range(3):
                forward(module, x, positions)
            table = cache.state_of(module).tables[(x.device, dtype, None)]
            snapshot = bits(module.inv_freq).clone()
            cos, sin = table.columns
            embedding, equal, watch = torch.embedding, torch.equal, table.watch
            # The lambdas are timed within this iteration (B023 does not apply).
            variants = {
                "patched": lambda: forward(module, x, positions),  # noqa: B023
                "checked": lambda: (equal(bits(module.inv_freq), snapshot), forward(module, x, positions)),  # noqa: B023
                "watch": watch.holds,
                "floor": lambda: (embedding(cos, positions), embedding(sin, positions)),  # noqa: B023
            }
            times = latency.alternate(
                {key: (function, ()) for key, function in variants.items()}, "cpu", rounds=args.rounds
            )
        median = {key: statistics.median(values) for key, values in times.items()}
        added = median["checked"] - median["patched"]
        print(
            f"{name:5}  {median['patched']:7.2f}  {median['checked']:12.2f}  "
            f"{added:5.2f} ({added / median['patched']:.0%})  {median['watch']:9.2f}  {median['floor']:5.2f}"
        )


if __name__ == "__main__":
    main()
