"""What the exact range check costs per call, by way of reading the
positions' extent (rope_patch.cache.bounds).

On an accelerator a table answers only after the smallest and largest
position were read on the host (an out-of-range gather there is a
device-side assert). Every way below ends in that host read, so on CUDA
each call's wall time is its whole cost (the device is idle between calls;
inside a real forward the read also waits for the work queued before it).
Times, per call, in alternating blocks (rope_patch.diagnostics.latency.
alternate: wall time on CUDA, this thread's CPU time on one CPU thread),
for decode (1x1) and prefill (1x512, 4x4096) positions:

- *stack + tolist*: ``torch.stack(torch.aminmax(p)).tolist()``, the check
  before rope_patch.cache.bounds (two kernels, two allocations, one copy);
- *bounds (one kernel)*: the reduction of ``bounds.extent``: ``aminmax``
  into a per-thread buffer, one copy;
- *bounds, a new tensor*: ``bounds.extent`` as a decode step meets it (a
  tensor it has not seen: the bookkeeping plus the reduction);
- *pinned + event* (CUDA only): ``aminmax`` into a device buffer, a
  non-blocking copy into pinned host memory, an event waited on: the
  candidate that avoids a pageable copy;
- *known (other table)*: ``bounds.extent`` for the same unchanged tensor
  asked by another table of the same module (Gemma 3's second attention
  type on transformers 5.x): no kernel.

    python benchmarks/bench_bounds.py [--device cuda] [--rounds 21]

``benchmarks/gpu_check.py`` runs :func:`measure` on CUDA (part "latency").
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

from rope_patch.cache import bounds  # noqa: E402
from rope_patch.diagnostics import latency  # noqa: E402

SHAPES = ((1, 1), (1, 512), (4, 4096))
#: Stands for the module whose tables ask (``id()`` of a module).
MODULE = 1


def _ways(device: torch.device, positions: torch.Tensor) -> dict:
    """name -> a function doing one check of ``positions``."""
    ways = {
        "stack + tolist": lambda: torch.stack(torch.aminmax(positions)).tolist(),
        "bounds (one kernel)": lambda: bounds._reduce(positions),
    }
    twins = (positions, positions.clone())
    table = object()

    def new_tensor():  # alternate two equal tensors: each call misses
        twins_used.reverse()
        return bounds.extent(twins_used[0], MODULE, table)

    twins_used = list(twins)
    ways["bounds, a new tensor"] = new_tensor
    if device.type == "cuda":
        low_high = torch.empty(2, dtype=positions.dtype, device=device)
        out = (low_high[0], low_high[1])
        host = torch.empty(2, dtype=positions.dtype, pin_memory=True)
        event = torch.cuda.Event()

        def pinned():
            torch.aminmax(positions, out=out)
            host.copy_(low_high, non_blocking=True)
            event.record()
            event.synchronize()
            return host.tolist()

        ways["pinned + event"] = pinned
    first, second = object(), object()
    bounds.extent(positions, MODULE, first)  # the first table's reading

    def known():
        # Ask as the second table every time (the untimed first call of a
        # block reads it again if another way replaced the known tensor).
        bounds._last.askers.discard(id(second))
        return bounds.extent(positions, MODULE, second)

    ways["known (other table)"] = known
    return ways


def measure(device="cpu", rounds: int = 21, shapes=SHAPES) -> list[dict]:
    """Microseconds per check (median over ``rounds`` alternating blocks,
    rope_patch.diagnostics.latency.alternate), one row per (shape, way);
    every way is checked to read the true extent first."""
    device = torch.device(device)
    rows = []
    for batch, seq in shapes:
        positions = (torch.arange(seq) + 1000).expand(batch, seq).contiguous().to(device)
        truth = [positions.min().item(), positions.max().item()]
        ways = _ways(device, positions)
        for name, way in ways.items():
            assert list(way()) == truth, name
        times = latency.alternate({name: (way, ()) for name, way in ways.items()}, device, rounds=rounds)
        rows.extend({"shape": f"{batch}x{seq}", "way": name, "us": statistics.median(times[name])} for name in ways)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = measure(args.device, args.rounds)
    print(f"torch {torch.__version__}, {args.device}, median of {args.rounds} alternating blocks, us per check")
    print("| shape | way | us | vs stack + tolist |")
    print("|---|---|---|---|")
    base = {r["shape"]: r["us"] for r in rows if r["way"] == "stack + tolist"}
    for r in rows:
        print(f"| {r['shape']} | {r['way']} | {r['us']:.2f} | {r['us'] / base[r['shape']]:.2f}x |")


if __name__ == "__main__":
    main()
