"""Run the four CPU benchmarks of rope_patch and print markdown tables.

    python benchmarks/run_all.py [--output FILE] [--sections latency,generate,memory,import] [--quick]

1. per-call latency of the rotary forward: unpatched (the class's original
   function), patched, and the floor (two bare lookups on the same tables),
   one thread and the default threads, Qwen3 and Llama-3 RoPE, bf16 and fp32,
   decode 1x1 and 8x1, prefill 1x512 and 4x4096; plus decode through
   ``nn.Module.__call__`` as a model calls it;
2. end-to-end greedy generation of 64 new tokens on small random-weight Qwen3
   models, tokens identical, alternating runs;
3. table memory after 2k and 32k positions, against the eager approach of
   transformers PR #45748;
4. import cost of ``rope_patch.auto`` and the modeling modules it imports.

Every comparison is a ratio measured in one run with alternating blocks (the
machine this was written on is a noisy shared one). Targets are checked at
the end (PASS/MISS); the exit status is 0 either way, 1 if a benchmark found
a patched result that differs from the unpatched one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from harness import generate as gen  # noqa: E402
from harness.common import MODEL_TYPES, dtype_name, forward_latency  # noqa: E402
from harness.imports import ImportRow, import_cost  # noqa: E402
from harness.machine import machine_description  # noqa: E402
from harness.memory import MemoryRow, table_memory  # noqa: E402

from rope_patch.diagnostics.latency import DEFAULT_SHAPES, LatencyRow  # noqa: E402

SECTIONS = ("latency", "generate", "memory", "import")

#: Targets of the issue.
DECODE_SPEEDUP = 3.0
DECODE_OVER_FLOOR = 1.5
PREFILL_SPEEDUP = 5.0
GENERATE_SMALL_SPEEDUP = 1.03
MEMORY_OVER_USED = 2.0
IMPORT_ADDED_MS = 50.0


class Report:
    """Markdown to stdout (and to ``--output``), progress to stderr."""

    def __init__(self, path: str | None):
        self.lines: list[str] = []
        self.path = path

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self("| " + " | ".join(str(cell) for cell in row) + " |")
        self()

    def save(self) -> None:
        if self.path:
            with open(self.path, "w") as handle:
                handle.write("\n".join(self.lines) + "\n")


def progress(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


def shape_name(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


# --------------------------------------------------------------------------


def run_latency(report: Report, quick: bool) -> list[LatencyRow]:
    default_threads = torch.get_num_threads()
    thread_settings = sorted({1, default_threads})
    shapes = ((1, 1), (8, 1), (1, 512)) if quick else DEFAULT_SHAPES
    repeats = 5 if quick else None
    rows = []
    for threads in thread_settings:
        for model_type in MODEL_TYPES:
            for dtype in (torch.bfloat16, torch.float32):
                rows += forward_latency(
                    model_type,
                    "cpu",
                    dtype,
                    shapes,
                    repeats=repeats,
                    threads=threads,
                    with_disabled=True,
                    progress=progress,
                )
    report("## 1. Per-call latency of the rotary forward (CPU)")
    report()
    report(
        "Microseconds per call, median of alternating blocks. *unpatched*: the class's original "
        "function (`Cls.forward.__wrapped__`) called directly; *patched*: the installed forward; "
        "*floor*: a bare module doing only the two `torch.embedding` lookups on the same tables; "
        "*disabled()*: the patched forward inside `rope_patch.disabled()`; *speedup (fastest blocks)*: "
        "the same ratio from each variant's fastest block, a second opinion when other processes share the "
        "cores (their noise only adds time). *clock*: with one thread, the thread's CPU time (time slices "
        "taken by other processes on this shared machine are not counted); with several threads, wall time, "
        "which other processes on the same cores inflate."
    )
    report()
    report.table(
        [
            "threads",
            "model",
            "dtype",
            "shape",
            "unpatched",
            "patched",
            "floor",
            "speedup",
            "patched/floor",
            "disabled()",
            "speedup (fastest blocks)",
            "clock",
        ],
        [
            [
                r.threads,
                r.label,
                dtype_name(r.dtype),
                shape_name(r.shape),
                f"{r.unpatched_us:.1f}",
                f"{r.patched_us:.1f}",
                f"{r.floor_us:.1f}",
                f"**{r.speedup:.2f}x**",
                f"{r.over_floor:.2f}x",
                f"{r.disabled_us:.1f}" if r.disabled_us is not None else "",
                f"{r.best_speedup:.2f}x",
                r.clock,
            ]
            for r in rows
        ],
    )
    module_rows = []
    for model_type in MODEL_TYPES:
        for dtype in (torch.bfloat16, torch.float32):
            module_rows += forward_latency(
                model_type,
                "cpu",
                dtype,
                ((1, 1), (8, 1)),
                repeats=repeats,
                threads=1,
                with_disabled=True,
                progress=progress,
                call="module",
            )
    report(
        "Decode through `nn.Module.__call__` (how a model calls it; one thread, thread CPU time). *unpatched*: the "
        "same instance with its class set to an unpatched subclass (the original forward); *disabled()*: the patched "
        "module inside `disabled()`."
    )
    report()
    report.table(
        ["model", "dtype", "shape", "unpatched", "patched", "floor", "speedup", "patched/floor", "disabled()"],
        [
            [
                r.label,
                dtype_name(r.dtype),
                shape_name(r.shape),
                f"{r.unpatched_us:.1f}",
                f"{r.patched_us:.1f}",
                f"{r.floor_us:.1f}",
                f"{r.speedup:.2f}x",
                f"{r.over_floor:.2f}x",
                f"{r.disabled_us:.1f}" if r.disabled_us is not None else "",
            ]
            for r in module_rows
        ],
    )
    return rows + module_rows


def run_generate(report: Report, quick: bool) -> list[gen.GenerateRow]:
    runs = {"qwen3 2 layers, hidden 128": 4 if quick else 100, "qwen3 4 layers, hidden 512": 3 if quick else 40}
    rows = []
    for name, overrides in gen.DEFAULT_MODELS.items():
        rows += gen.generate_throughput({name: overrides}, new_tokens=64, runs=runs[name], threads=1, progress=progress)
    report(f"## 2. End-to-end greedy generate, 64 new tokens (CPU, one thread, fp32, {rows[0].clock})")
    report()
    report(
        f"Random-weight Qwen3 (head_dim 128, vocabulary {gen.VOCAB}), batch 1, prompt "
        f"{gen.PROMPT} tokens, EOS suppressed. The same model instance runs unpatched "
        "(original forward), patched and *floor* (a rotary that only does the two lookups: the ceiling "
        "of any table implementation), in rotating order; tokens compared with the unpatched run. *paired quartiles*: "
        "25th-75th percentile of the per-round speedups (same round, adjacent runs)."
    )
    report()
    report.table(
        [
            "model",
            "params",
            "runs each",
            "unpatched tok/s",
            "patched tok/s",
            "floor tok/s",
            "patched speedup",
            "paired quartiles",
            "floor speedup",
            "tokens identical",
        ],
        [
            [
                r.model,
                f"{r.parameters / 1e6:.1f}M",
                r.runs,
                f"{r.unpatched_tok_s:.0f}",
                f"{r.patched_tok_s:.0f}",
                f"{r.floor_tok_s:.0f}",
                f"**{r.speedup:.3f}x**",
                f"{r.paired_low:.3f}-{r.paired_high:.3f}",
                f"{r.floor_tok_s / r.unpatched_tok_s:.3f}x",
                "yes" if r.identical else "**NO**",
            ]
            for r in rows
        ],
    )
    return rows


def run_memory(report: Report, quick: bool) -> list[MemoryRow]:
    rows = table_memory(used=(2048,) if quick else (2048, 2049, 32768), progress=progress)
    report("## 3. Table memory")
    report()
    report(
        "Bytes held by one rotary module's tables after a prefill of *used* positions and a decode step "
        "(`rope_patch.cache_info(module).bytes`), against the bytes of exactly those positions and the "
        "eager approach of transformers PR #45748 (max_position_embeddings x head_dim x 2 tables x fp32, "
        "held from construction). 2049 is the worst case of the power-of-two growth."
    )
    report()
    report.table(
        ["model", "max positions", "dtype", "used", "table MiB", "used MiB", "table/used", "eager MiB", "table/eager"],
        [
            [
                r.model_type,
                r.max_position_embeddings,
                r.dtype,
                r.used,
                f"{r.table_bytes / 2**20:.2f}",
                f"{r.used_bytes / 2**20:.2f}",
                f"**{r.over_used:.2f}x**",
                f"{r.eager_bytes / 2**20:.1f}",
                f"{r.table_bytes / r.eager_bytes:.3f}",
            ]
            for r in rows
        ],
    )
    return rows


def run_import(report: Report, quick: bool) -> ImportRow:
    row = import_cost(runs=4 if quick else 15, repo_root=REPO, progress=progress)
    report("## 4. Import cost")
    report()
    report(
        f"Fresh interpreters, {row.runs} alternating pairs, median wall time of "
        '`python -c "import transformers"` vs `python -c "import transformers, rope_patch.auto"`; '
        "*in-process*: `import rope_patch.auto` timed with perf_counter inside the interpreter after "
        "`import transformers` (median), the precise added cost."
    )
    report()
    report.table(
        [
            "import transformers",
            "+ rope_patch.auto",
            "added (wall, median of pairs)",
            "added (in-process)",
            "modules added",
            "modeling modules imported",
        ],
        [
            [
                f"{row.base_ms:.0f} ms",
                f"{row.patched_ms:.0f} ms",
                f"{row.added_ms:+.1f} ms",
                f"{row.in_process_ms:.1f} ms",
                row.new_modules,
                len(row.modeling_modules) if not row.modeling_modules else ", ".join(row.modeling_modules),
            ]
        ],
    )
    return row


# --------------------------------------------------------------------------


def check_targets(report: Report, results: dict) -> None:
    report("## Targets")
    report()
    lines = []

    def target(name: str, ok: bool, detail: str) -> None:
        lines.append([name, "PASS" if ok else "**MISS**", detail])

    latency = [r for r in results.get("latency", []) if r.call == "function"]
    for threads in sorted({r.threads for r in latency}):
        rows = [r for r in latency if r.threads == threads]
        where = f"{threads} thread{'s' if threads > 1 else ''}, {rows[0].clock}"
        decode = [r for r in rows if r.decode]
        worst = min(decode, key=lambda r: r.speedup)
        target(
            f"decode per-call speedup >= {DECODE_SPEEDUP:g}x (bf16+fp32, qwen3+llama3, 1x1 and 8x1; {where})",
            worst.speedup >= DECODE_SPEEDUP,
            f"min {worst.speedup:.2f}x ({worst.label} {dtype_name(worst.dtype)} {shape_name(worst.shape)}); "
            f"max {max(r.speedup for r in decode):.2f}x",
        )
        worst = max(decode, key=lambda r: r.over_floor)
        target(
            f"patched within {DECODE_OVER_FLOOR:g}x of floor at decode ({where})",
            worst.over_floor <= DECODE_OVER_FLOOR,
            f"max {worst.over_floor:.2f}x ({worst.label} {dtype_name(worst.dtype)} {shape_name(worst.shape)})",
        )
        prefill = [r for r in rows if r.shape == (4, 4096)]
        if prefill:
            worst = min(prefill, key=lambda r: r.speedup)
            target(
                f"prefill 4x4096 speedup >= {PREFILL_SPEEDUP:g}x ({where})",
                worst.speedup >= PREFILL_SPEEDUP,
                f"min {worst.speedup:.1f}x ({worst.label} {dtype_name(worst.dtype)})",
            )
    generate = results.get("generate")
    if generate:
        small = generate[0]
        target(
            "generate never slower, tokens identical",
            all(r.speedup >= 1.0 and r.identical for r in generate),
            "; ".join(
                f"{r.model}: {r.speedup:.3f}x (paired quartiles {r.paired_low:.3f}-{r.paired_high:.3f}), "
                f"identical {r.identical}"
                for r in generate
            ),
        )
        target(
            f"generate >= {GENERATE_SMALL_SPEEDUP:g}x tokens/s on the 2-layer model",
            small.speedup >= GENERATE_SMALL_SPEEDUP and small.identical,
            f"{small.speedup:.3f}x (floor, the ceiling of any table: {small.floor_tok_s / small.unpatched_tok_s:.3f}x)",
        )
    memory = results.get("memory")
    if memory:
        worst = max(memory, key=lambda r: r.over_used)
        target(
            f"memory <= {MEMORY_OVER_USED:g}x the bytes of positions used",
            worst.over_used <= MEMORY_OVER_USED,
            f"max {worst.over_used:.2f}x ({worst.model_type} {worst.dtype} {worst.used})",
        )
    row = results.get("import")
    if row:
        target(
            f"import <= {IMPORT_ADDED_MS:g} ms added, no modeling module imported",
            row.added_ms <= IMPORT_ADDED_MS and row.in_process_ms <= IMPORT_ADDED_MS and not row.modeling_modules,
            f"{row.added_ms:+.1f} ms wall, {row.in_process_ms:.1f} ms in-process, "
            f"{len(row.modeling_modules)} modeling modules",
        )
    report.table(["target", "result", "measured"], lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the markdown report to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and runs (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    report = Report(args.output)
    start = time.time()
    machine = machine_description()
    report(f"# rope_patch benchmarks (transformers {machine['transformers']})")
    report()
    report("Command: `" + " ".join([sys.executable, *sys.argv]) + "`")
    report()
    report.table(["machine", ""], [[key, value] for key, value in machine.items()])
    runners = {"latency": run_latency, "generate": run_generate, "memory": run_memory, "import": run_import}
    results = {}
    status = 0
    for section in sections:
        began = time.time()
        try:
            results[section] = runners[section](report, args.quick)
            load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
            report(f"_{section}: {time.time() - began:.0f} s; load average afterwards {load}_")
            report()
        except AssertionError as error:  # a patched result differs: that is a bug, not a number
            report(f"**{section}: FAILED: {error}**")
            report()
            status = 1
    check_targets(report, results)
    report(f"Total time: {time.time() - start:.0f} s.")
    report.save()
    return status


if __name__ == "__main__":
    sys.exit(main())
