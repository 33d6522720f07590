"""Why decode gains less on transformers 5.25: its text rotaries dropped
``@torch.no_grad()`` from ``forward`` (5.24 and earlier had it), so the
unpatched call no longer pays for entering and leaving no-grad mode.

In one run, alternating blocks on the same module (one torch thread, thread
CPU time, medians; decode positions as ``bench_fast_path.py``): the installed forward as transformers ships it, the same
function decorated with ``torch.no_grad()`` (what 5.24 ran), and the patched
forward. The speed-up against the decorated one is what the same engine
would show on 5.24. Each row's patched call must be answered from tables and
equal the unpatched one, or the script stops.

    python benchmarks/bench_no_grad.py [--rounds 15]

Meant for transformers >= 5.25 (on earlier releases the installed forward is
already decorated, and the second column decorates it twice).
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
from benchmarks.harness.common import build_rotary, dtype_name  # noqa: E402
from rope_patch.diagnostics import latency  # noqa: E402
from rope_patch.identity import difference  # noqa: E402

SHAPES = ((1, 1), (8, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    import transformers

    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; one thread, thread CPU time")
    columns = ("unpatched us", "unpatched + @no_grad us", "patched us", "speed-up", "speed-up vs @no_grad")
    print("| model | dtype | shape | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    with latency.ensure_patched():
        for model in ("qwen3", "llama3"):
            for dtype in (torch.bfloat16, torch.float32):
                rotary = build_rotary(model)
                plain = latency.unpatched_class(type(rotary))
                decorated = type(f"NoGrad{plain.__name__}", (plain,), {"forward": torch.no_grad()(plain.forward)})
                for batch, seq in SHAPES:
                    x = torch.randn(batch, seq, rotary.inv_freq.numel() * 2, dtype=dtype)
                    positions = latency.position_ids_for((batch, seq), "cpu")  # as bench_fast_path
                    call = (rotary, (x, positions))
                    samples = latency.alternate(
                        {"unpatched": call, "no_grad": call, "patched": call},
                        "cpu",
                        rounds=args.rounds,
                        contexts={
                            "unpatched": lambda cls=plain, module=rotary: latency.as_class(module, cls),
                            "no_grad": lambda cls=decorated, module=rotary: latency.as_class(module, cls),
                        },
                    )
                    problem = difference(plain.forward(rotary, x, positions), rotary(x, positions))
                    if problem is not None or not rope_patch.cache_info(rotary).answered:
                        raise RuntimeError(
                            f"{model} {dtype_name(dtype)} {batch}x{seq}: patched call not "
                            f"answered from tables identically: {problem or 'not answered'}"
                        )
                    unpatched, no_grad, patched = (statistics.median(samples[k]) for k in samples)
                    print(
                        f"| {model} | {dtype_name(dtype)} | {batch}x{seq} | {unpatched:.2f} | {no_grad:.2f} | "
                        f"{patched:.2f} | {unpatched / patched:.2f}x | {no_grad / patched:.2f}x |"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
