"""GPU check, part ``latency``: per-call latency of the benchmark rotaries
(unpatched, patched, floor; exact bound check and sync-free), and what each
way of reading the positions' extent costs."""

from __future__ import annotations

import bench_bounds
import torch

from harness.common import MODELS, forward_latency
from harness.gpu.run import Deadline, Outcome, log, repatched, us


def part_latency(device, deadline: Deadline, outcome: Outcome, args) -> None:
    if args.cpu_smoke:
        shapes = ((1, 1), (1, 64))
    else:
        shapes = ((1, 1), (1, 512)) if args.quick else ((1, 1), (8, 1), (1, 512), (4, 4096))
    modes = {"exact bound check": {}, "sync_free": {"sync_free": True}}
    per_shape = max(deadline.left(), 1) / (len(modes) * len(shapes) * len(MODELS) * 1.5)
    budget_s = min(0.6, max(per_shape, 0.1))
    repeats = 3 if args.cpu_smoke else None
    rows = []
    try:
        for model_type in MODELS:
            for mode, kwargs in modes.items():
                if deadline.passed():
                    outcome.skip("latency", f"deadline before {model_type} {mode}")
                    return
                with repatched(**kwargs):
                    measured = forward_latency(
                        model_type,
                        device,
                        torch.bfloat16,
                        shapes,
                        repeats=repeats,
                        budget_s=budget_s,
                        with_disabled=True,
                        progress=log,
                    )
                    rows.extend((mode, row) for row in measured)
    except AssertionError as error:
        outcome.fail(f"latency: {error}")
    finally:
        _print_latency(rows)
    _bounds_latency(device, deadline, outcome, args)
    for mode, r in rows:
        outcome.row(
            "latency",
            model=r.label,
            mode=mode,
            shape=f"{r.shape[0]}x{r.shape[1]}",
            unpatched_us=r.unpatched_us,
            patched_us=r.patched_us,
            floor_us=r.floor_us,
            speedup=r.speedup,
        )
        if r.shape in ((1, 1), (4, 4096)):
            outcome.summary.append(
                f"latency {r.label} bf16 {r.shape[0]}x{r.shape[1]} {mode}: unpatched {r.unpatched_us:.1f} us, "
                f"patched {r.patched_us:.1f} us ({r.speedup:.2f}x), floor {us(r.floor_us)} us"
            )


def _bounds_latency(device, deadline: Deadline, outcome: Outcome, args) -> None:
    """Per-check cost of each way of reading the positions' extent."""
    if deadline.passed():
        outcome.skip("latency", "deadline before the bound-check ways")
        return
    try:
        checks = bench_bounds.measure(device, rounds=3 if args.cpu_smoke else 11)
    except AssertionError as error:
        outcome.fail(f"latency: bound-check ways: {error}")
        return
    base = {r["shape"]: r["us"] for r in checks if r["way"] == "stack + tolist"}
    log("| shape | way of reading the extent | us per check | vs stack + tolist |")
    log("|---|---|---|---|")
    for r in checks:
        log(f"| {r['shape']} | {r['way']} | {r['us']:.2f} | {r['us'] / base[r['shape']]:.2f}x |")
        outcome.row("bounds", shape=r["shape"], way=r["way"], us=r["us"], ratio=r["us"] / base[r["shape"]])
        if r["shape"] == "1x1":
            outcome.summary.append(f"bound check 1x1 {r['way']}: {r['us']:.2f} us")
    log()


def _print_latency(rows) -> None:
    if not rows:
        return
    log()
    log("| model | mode | shape | unpatched us | patched us | floor us | speedup | patched/floor | disabled() us |")
    log("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows:
        over = "-" if r.over_floor is None else f"{r.over_floor:.2f}x"
        log(
            f"| {r.label} | {mode} | {r.shape[0]}x{r.shape[1]} | {r.unpatched_us:.1f} | {r.patched_us:.1f} | "
            f"{us(r.floor_us)} | {r.speedup:.2f}x | {over} | {us(r.disabled_us)} |"
        )
    log()
