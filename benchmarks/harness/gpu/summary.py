"""GPU check: the markdown summary tables of a run's rows, and of every
run appended to a ``--summary-json`` file."""

from __future__ import annotations

import json

from harness.gpu.run import log, us

TABLES = {
    "generate": (
        "Greedy generate, bf16, batch 1, prompt 16 tokens (median tokens/s)",
        [
            "transformers",
            "model",
            "mode",
            "tokens x runs",
            "unpatched tok/s",
            "patched tok/s",
            "patched/unpatched",
            "tokens identical",
            "warm-up s",
        ],
        lambda r: [
            r["transformers"],
            r["model"],
            r["mode"],
            r["runs"],
            f"{r['unpatched_tok_s']:.1f}",
            f"{r['patched_tok_s']:.1f}",
            f"**{r['ratio']:.3f}x**",
            _yes(r["identical"]),
            f"{r['warm_up_s']:.1f}",
        ],
    ),
    "latency": (
        "Per-call rotary latency, bf16, microseconds (median of alternating blocks)",
        ["transformers", "model", "mode", "shape", "unpatched us", "patched us", "floor us", "speedup"],
        lambda r: [
            r["transformers"],
            r["model"],
            r["mode"],
            r["shape"],
            f"{r['unpatched_us']:.1f}",
            f"{r['patched_us']:.1f}",
            us(r["floor_us"]),
            f"**{r['speedup']:.2f}x**",
        ],
    ),
    "bounds": (
        "The exact bound check: microseconds per reading of the positions' extent (median)",
        ["transformers", "shape", "way", "us", "vs stack + tolist"],
        lambda r: [r["transformers"], r["shape"], r["way"], f"{r['us']:.2f}", f"{r['ratio']:.2f}x"],
    ),
    "robustness": (
        "bf16 under use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8: NaN counts",
        [
            "transformers",
            "what",
            "case",
            "unpatched NaN",
            "patched NaN",
            "values",
            "patched from tables",
            "patched == unpatched",
        ],
        lambda r: [
            r["transformers"],
            r["what"],
            r["case"],
            r["unpatched_nan"],
            r["patched_nan"],
            r["values"],
            _yes(r["answered"]),
            _yes(r["identical"]),
        ],
    ),
    "checks": (
        "Other checks",
        ["transformers", "part", "result"],
        lambda r: [r["transformers"], r["part"], r["result"]],
    ),
}


def _yes(value) -> str:
    return "yes" if value else "**no**"


def summary_markdown(rows: list[dict]) -> list[str]:
    lines = []
    for table, (title, header, cells) in TABLES.items():
        selected = [r for r in rows if r["table"] == table]
        if not selected:
            continue
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in selected]
        lines.append("")
    return lines


def print_summary(path: str) -> int:
    try:
        with open(path) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except OSError as error:
        log(f"no summary: {error}")
        return 1
    for line in summary_markdown(rows):
        log(line)
    return 0
