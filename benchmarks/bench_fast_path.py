"""Per-call cost of the fast path at decode: patched vs unpatched vs the
floor (two bare ``torch.embedding`` gathers on the same tables), one torch
thread, thread CPU time, alternating blocks, medians:

    python benchmarks/bench_fast_path.py [--json OUT] [--before FILE] [--tree PATH] [--quick]

Rows: the two benchmark models (Qwen3 and Llama 3 shaped, 2-D decode 1x1
and 8x1, and a 512-token prefill 1x512), a Gemma 3 rotary called with its ``layer_type`` (the keyed
forwards: Gemma 3 and kin), and a Qwen2.5-VL-shaped M-RoPE rotary called
with 3-axis decode positions (3x1x1, 3x8x1; no floor: its answer is not two
plain gathers); bf16 and fp32 each.

``--tree PATH`` measures the rope_patch of another checkout (a worktree of an
earlier commit, say) with this script, so that ``--json`` of one tree and
``--before`` of the other print a before/after table of the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--before", help="a --json file of an earlier run: print before/after per row")
    parser.add_argument("--tree", help="import rope_patch from this checkout (default: this one)")
    parser.add_argument("--quick", action="store_true", help="a few rounds (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(args.tree) if args.tree else repo)
    sys.path.insert(1, repo)  # benchmarks.harness: this checkout's

    import torch
    import transformers

    import rope_patch
    from benchmarks.harness.common import build_rotary, dtype_name
    from rope_patch.diagnostics import latency

    def gemma3():
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        config = transformers.Gemma3TextConfig(head_dim=128, hidden_size=1024, num_attention_heads=8)
        return Gemma3RotaryEmbedding(config).eval()

    def qwen2_5_vl():
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

        config = transformers.Qwen2_5_VLConfig()
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return Qwen2_5_VLRotaryEmbedding(config=config).eval()

    layer_type = "sliding_attention" if int(transformers.__version__.split(".")[0]) >= 5 else None
    cases = [
        ("qwen3", lambda: build_rotary("qwen3", "cpu"), ((1, 1), (8, 1), (1, 512)), None),
        ("llama3", lambda: build_rotary("llama3", "cpu"), ((1, 1), (8, 1), (1, 512)), None),
        ("gemma3 (layer_type)" if layer_type else "gemma3", gemma3, ((1, 1), (8, 1)), layer_type),
        ("qwen2.5-vl (M-RoPE)", qwen2_5_vl, ((3, 1, 1), (3, 8, 1)), None),
    ]
    rows = []
    with latency.ensure_patched(), latency.threads_scope(1):
        for label, make, shapes, key in cases:
            for dtype in (torch.bfloat16, torch.float32):
                measured = latency.measure(
                    make(), dtype, shapes, layer_type=key, label=label, repeats=5 if args.quick else None
                )
                rows.extend(
                    {
                        "model": label,
                        "dtype": dtype_name(dtype),
                        "shape": "x".join(map(str, row.shape)),
                        "unpatched": row.unpatched_us,
                        "patched": row.patched_us,
                        "floor": row.floor_us,
                    }
                    for row in measured
                )
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, rope_patch {rope_patch.__version__} "
        f"from {os.path.dirname(os.path.dirname(os.path.abspath(rope_patch.__file__)))}; one thread, thread CPU time"
    )
    before = {}
    if args.before:
        with open(args.before) as handle:
            before = {(r["model"], r["dtype"], r["shape"]): r for r in json.load(handle)["rows"]}
    header = "| model | dtype | shape | unpatched us | patched us | floor us | speed-up | patched/floor |"
    if before:
        header += " before: speed-up | before: patched/floor |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        line = (
            f"| {row['model']} | {row['dtype']} | {row['shape']} | {row['unpatched']:.2f} | {row['patched']:.2f} | "
            f"{_floor(row['floor'])} | {row['unpatched'] / row['patched']:.2f}x | "
            f"{_ratio(row['patched'], row['floor'])} |"
        )
        old = before.get((row["model"], row["dtype"], row["shape"]))
        if before:
            line += (
                f" {old['unpatched'] / old['patched']:.2f}x | {_ratio(old['patched'], old['floor'])} |"
                if old
                else " | |"
            )
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"transformers": transformers.__version__, "rows": rows}, handle, indent=1)
    return 0


def _floor(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _ratio(patched, floor) -> str:
    return "" if floor is None else f"{patched / floor:.2f}x"


if __name__ == "__main__":
    raise SystemExit(main())
