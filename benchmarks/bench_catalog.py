"""Is any class slower patched than unpatched? Per-call latency of every
rotary class of the installed transformers that rope_patch answers from
tables, each built from its model's default config (as the contract test
builds it), at decode (1x1) and a short prefill (1x128).

The contract test proves every class bit-identical; this looks for the
other half of the promise, "never slower", across the same classes: a form
that copies into a learnt layout, a watch that compares a config dict on
every call, an M-RoPE recomposition. One thread, alternating blocks of the
original and the installed forward on the same module (rope_patch.
diagnostics.latency.measure), medians. Classes whose calls are not answered
from tables at these shapes (vision rotaries, seq_len forwards) are listed as not measured, with the reason.

    python benchmarks/bench_catalog.py [--rounds 7] [--dtype fp32] [--pattern qwen*]
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import statistics
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import rope_patch  # noqa: E402
from rope_patch.diagnostics import latency  # noqa: E402
from rope_patch.diagnostics.instances import InstantiationError, build_instance  # noqa: E402
from rope_patch.diagnostics.scan import scan_catalog  # noqa: E402
from rope_patch.discovery import POSITIONS  # noqa: E402
from rope_patch.status import Status, classify  # noqa: E402

SHAPES = ((1, 1), (1, 128))
#: For forwards that take only multi-axis (M-RoPE) positions: text tokens on 3 axes.
AXES_SHAPES = ((3, 1, 1), (3, 1, 128))


def measure_catalog(dtype, rounds: int, pattern: str = "*", progress=None) -> tuple[list, list]:
    """(rows, skipped): per class and position layout it was measured with
    (2-D, and 3-axis for M-RoPE forwards: text tokens on every axis), (name,
    decode row, prefill row); per class not measured (name, reason)."""
    rows, skipped = [], []
    settings = rope_patch.settings.active
    for rotary in scan_catalog().rotaries:
        if not (fnmatch.fnmatch(rotary.model_type, pattern) or fnmatch.fnmatch(rotary.name, pattern)):
            continue
        decision = classify(rotary, settings)
        if decision.status is not Status.CACHED:
            continue
        if rotary.convention != POSITIONS:
            skipped.append((rotary.name, "forward(x, seq_len): not timed here"))
            continue
        try:
            built = build_instance(rotary)
        except InstantiationError as error:
            skipped.append((rotary.name, str(error).splitlines()[0][:160]))
            continue
        problems = []
        for layout, shapes in (("2-D", SHAPES), ("3-axis", AXES_SHAPES)):
            try:
                measured = latency.measure(
                    built.module,
                    dtype,
                    shapes,
                    layer_type=built.layer_types[0],
                    repeats=rounds,
                    threads=1,
                    label=rotary.name,
                )
            except Exception as error:  # noqa: BLE001 - the unpatched forward refuses these shapes, or not answered
                problems.append(f"{layout}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            rows.append((rotary.name, *measured))
            if progress:
                progress(
                    f"{rotary.name}: " + ", ".join(f"{latency.shape_name(r.shape)} {r.speedup:.2f}x" for r in measured)
                )
        if len(problems) == 2:
            skipped.append((rotary.name, "; ".join(problems)))
    return rows, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--pattern", default="*", help="model types or class names (glob)")
    args = parser.parse_args()
    import transformers

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    assert rope_patch.patch()
    rows, skipped = measure_catalog(
        dtype, args.rounds, args.pattern, progress=lambda line: print(line, file=sys.stderr)
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}, one thread, "
        f"medians of {args.rounds} alternating blocks; speedup = unpatched / patched"
    )
    print()
    decode = sorted(rows, key=lambda row: row[1].speedup)
    print(
        f"{len({row[0] for row in rows})} classes measured ({len(rows)} class x layout rows), "
        f"{len(skipped)} not measured."
    )
    for index, label in ((1, "decode 1x1"), (2, "prefill 1x128")):
        speedups = [row[index].speedup for row in rows]
        slower = [row[0] for row in rows if row[index].speedup < 1.0]
        print(
            f"{label}: median {statistics.median(speedups):.2f}x, lowest {min(speedups):.2f}x, "
            f"slower than unpatched: {len(slower)} {sorted(slower) if slower else ''}"
        )
    print()
    print("| class | decode shape | decode unpatched us | decode patched us | decode | prefill (x128) |")
    print("|---|---|---|---|---|---|")
    for name, first, second in decode:
        print(
            f"| {name} | {latency.shape_name(first.shape)} | {first.unpatched_us:.1f} | {first.patched_us:.1f} | "
            f"{first.speedup:.2f}x | {second.speedup:.2f}x |"
        )
    if skipped:
        print()
        print("Not measured:")
        for name, reason in skipped:
            print(f"- {name}: {reason}")


if __name__ == "__main__":
    main()
