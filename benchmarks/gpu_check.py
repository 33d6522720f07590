"""GPU check of rope_patch: bit-identity on CUDA, per-call latency,
torch.compile, CUDA graphs, numerics, robustness under deterministic mode,
and greedy generate throughput. Run by ``benchmarks/gpu_check.sh`` (once per
transformers version); ``--cpu-smoke`` runs every part on CPU with tiny
shapes in seconds (CUDA-only steps print why they are skipped).

Parts (``--parts``, comma list, default all):

identity    every rotary class of the installed transformers, proved with
            ``rope_patch.diagnostics.verify.verify_class`` in fp32, bf16, fp16;
latency     per-call latency of the qwen3 and llama3 rotaries, unpatched /
            patched / floor, bf16, with the exact bound check (one host sync)
            and with ``sync_free=True``; then what each way of reading the
            positions' extent costs per check (benchmarks/bench_bounds.py:
            the old stack + tolist, rope_patch.cache.bounds' one kernel,
            pinned memory + event, and no kernel for a tensor already read);
compile     a small Qwen3 step under ``torch.compile(fullgraph=True)``,
            patched vs unpatched: step time and logits;
graph       that step captured in a CUDA graph, unpatched / patched /
            sync-free: replay time and outputs (CUDA only);
numerics    under ``torch.use_deterministic_algorithms(True)`` and TF32
            ``"high"`` precision: patched bf16/fp32 outputs for positions up
            to 32k have no NaN and equal the exact values;
robustness  bf16 under ``use_deterministic_algorithms(True)`` with
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: NaN counts of the unpatched
            and the patched rotary (alone, and inside a greedy generate of a
            Qwen3-0.6B-shaped model), whatever they are;
generate    greedy generate tokens/s, patched vs unpatched, bf16, on random-
            weight models shaped like Qwen3-0.6B (28 layers) and Llama-3-8B
            (4 of its 32 layers), in three modes: eager with the exact bound
            check, eager ``sync_free=True``, and a static cache with
            ``model.forward`` under ``torch.compile``.

Every part has a deadline (``--budget`` seconds for the whole run, split over
the parts; unused time goes to later parts); a part that runs out stops and
is reported INCOMPLETE. The run ends with markdown tables (``--summary-json
FILE`` also appends their rows to FILE; ``--print-summary FILE`` prints the
tables of every run appended there).

Exit status: 1 if any bit-identity check failed; else 3 if any part was
skipped, errored or ran out of time; else 0.

This script is the run: options, the budget split over the parts, the
summary. Each part, and what they share, is in benchmarks/harness/gpu/
(run.py: settings, Outcome, Deadline, scopes; identity.py, latency.py,
steps.py for compile and graph, numerics.py, robustness.py,
generation.py; summary.py: the markdown tables).
"""

from __future__ import annotations

import os

# Must be set before cuBLAS is initialised (numerics and robustness need it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from harness.gpu.generation import MODELS_BUILT, part_generate  # noqa: E402
from harness.gpu.identity import part_identity  # noqa: E402
from harness.gpu.latency import part_latency  # noqa: E402
from harness.gpu.numerics import part_numerics  # noqa: E402
from harness.gpu.robustness import part_robustness  # noqa: E402
from harness.gpu.run import GENERATE_MODELS, GENERATE_MODES, Deadline, Outcome, free_memory, log  # noqa: E402
from harness.gpu.steps import part_compile, part_graph  # noqa: E402
from harness.gpu.summary import print_summary, summary_markdown  # noqa: E402
from harness.machine import machine_description  # noqa: E402

import rope_patch  # noqa: E402

PARTS = ("identity", "latency", "compile", "graph", "numerics", "robustness", "generate")
#: Share of the budget each part may use (unused time goes to later parts).
SHARES = {
    "identity": 0.14,
    "latency": 0.10,
    "compile": 0.08,
    "graph": 0.03,
    "numerics": 0.03,
    "robustness": 0.07,
    "generate": 0.55,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rope_patch GPU check (see the module docstring)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for all parts together")
    parser.add_argument("--limit", type=int, default=0, help="identity: check only the first N classes")
    parser.add_argument("--identity-pattern", default=None, help="identity: only model types / classes matching this")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and positions")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, tiny shapes and models, every part (CUDA-only steps skipped with a reason): seconds",
    )
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager on CPU")
    parser.add_argument("--generate-models", default=",".join(GENERATE_MODELS), help="generate: comma list")
    parser.add_argument("--generate-modes", default=",".join(GENERATE_MODES), help="generate: comma list")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, where waking idle OpenMP workers on a shared "
        "machine can cost milliseconds per op; unchanged on CUDA)",
    )
    parser.add_argument(
        "--allow-cpu-skips", action="store_true", help="on CPU, a skipped CUDA-only part is not 'incomplete'"
    )
    parser.add_argument("--summary-json", help="append this run's table rows (JSON lines) to this file")
    parser.add_argument("--print-summary", metavar="FILE", help="print the tables of the rows in FILE and exit")
    args = parser.parse_args(argv)
    if args.print_summary:
        return print_summary(args.print_summary)
    if args.cpu_smoke:
        args.device, args.allow_cpu_skips = "cpu", True
        args.identity_pattern = args.identity_pattern or "qwen2_vl"
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.allow_cpu_skips = args.allow_cpu_skips or device.type == "cpu"
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log(f"SKIPPED every part: --device {args.device} but torch {torch.__version__} sees no CUDA device")
        return 3
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")

    machine = machine_description()
    log("== rope_patch gpu_check: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    log(
        f"== device {device}; parts {','.join(parts)}; budget {args.budget:.0f} s; "
        f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')} for the whole process"
        + ("; --cpu-smoke (tiny shapes: a test of the code paths, not a measurement)" if args.cpu_smoke else "")
    )
    if device.type != "cuda":
        log(
            f"== no CUDA device in use ({'available' if torch.cuda.is_available() else 'torch sees none'}): "
            "CUDA-only steps are skipped"
        )
    if not rope_patch.patch():
        log("FAIL rope_patch.patch() did not patch (ROPE_PATCH_DISABLE set or unsupported versions)")
        return 1
    outcome = Outcome(machine["transformers"], args.summary_json)
    runners = {
        "identity": part_identity,
        "latency": part_latency,
        "compile": part_compile,
        "graph": part_graph,
        "numerics": part_numerics,
        "robustness": part_robustness,
        "generate": part_generate,
    }
    run_start = time.monotonic()
    for position, part in enumerate(parts):
        left = args.budget - (time.monotonic() - run_start)
        remaining_share = sum(SHARES[p] for p in parts[position:])
        seconds = max(5.0, left * SHARES[part] / remaining_share)
        log(f"\n== {part} (deadline {seconds:.0f} s)")
        start = time.monotonic()
        try:
            runners[part](device, Deadline(seconds), outcome, args)
        except Exception:  # noqa: BLE001 - one broken part must not hide the others
            log(traceback.format_exc())
            outcome.incomplete.append(f"{part}: raised (traceback above)")
        log(f"== {part} done in {time.monotonic() - start:.1f} s")
        if "generate" not in parts[position + 1 :]:
            MODELS_BUILT.clear()  # robustness leaves its model to generate only
        free_memory(device)
    log("\n== summary (transformers " + machine["transformers"] + f", {device})")
    for line in outcome.summary:
        log(f"  {line}")
    for line in outcome.incomplete:
        log(f"  INCOMPLETE {line}")
    log(f"  bit-identity failures: {len(outcome.failures)}")
    for line in outcome.failures[:50]:
        log(f"    {line}")
    log("\n== tables (markdown)\n")
    for line in summary_markdown(outcome.rows):
        log(line)
    status = outcome.status()
    log(f"== exit status {status} ({'FAILED' if status == 1 else 'incomplete' if status == 3 else 'ok'})")
    return status


if __name__ == "__main__":
    sys.exit(main())
