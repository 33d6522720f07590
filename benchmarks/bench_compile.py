"""What rope_patch costs a ``torch.compile``d model: a one-token step of a
small random-weight Qwen3 (the gpu_check step model), compiled with
``fullgraph=True``, patched against unpatched.

Under compile the patched forward defers to the original while dynamo traces
(docs/compatibility.md), so the graph is the unpatched one and the only
difference left is dynamo's guards on the replacement forward. Patched and
unpatched cannot share a process (unpatching changes the class's forward,
which recompiles), so each measurement is a fresh process: ``--rounds``
rounds, each one process per mode in rotating order, one torch thread,
median microseconds per step within a process, then the median over
rounds. Every process's logits must equal the first unpatched one's.

    python benchmarks/bench_compile.py [--rounds 5] [--backend eager|inductor]

The default backend, eager, needs no compiler; inductor on CPU needs a C++
compiler and compiles for about a minute per process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO, os.path.join(REPO, "benchmarks")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from harness.gpu.run import STEP_MODEL  # noqa: E402  (the gpu_check step model; float32 on CPU)

MODES = ("unpatched", "patched")
#: A traceback's closing line, ``package.module.SomeError: message``.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Unsupported)\b")


def inside(mode: str, backend: str, blocks: int, calls: int, logits_path: str) -> dict:
    """Build, compile and time the step in this process (``mode`` decides
    whether rope_patch is installed first); the logits go to ``logits_path``."""
    import torch

    import rope_patch

    if mode == "patched":
        import rope_patch.auto  # as a user does
    from harness.gpu.steps import step_inputs, step_model, time_steps

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    input_ids, positions = step_inputs(cpu)
    compiled = torch.compile(step_model(cpu), fullgraph=True, backend=backend)

    def one_step():
        return compiled(input_ids, position_ids=positions, use_cache=False).logits

    with torch.no_grad():
        logits = one_step()  # compiles
        for _ in range(calls):  # warm-up
            one_step()
        step_us = time_steps(one_step, cpu, rounds=blocks, calls=calls)
    torch.save(logits, logits_path)
    return {"mode": mode, "patched": rope_patch.is_patched(), "step_us": step_us}


def step(mode: str, backend: str = "eager", blocks: int = 30, calls: int = 20):
    """One process of ``mode``: (its report, its logits). Raises RuntimeError
    with the child's last lines if it fails (the unpatched model may not
    compile on old torch + transformers pairs), or if it is patched or not
    against its mode."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "logits.pt")
        command = [sys.executable, os.path.abspath(__file__), "--inside", mode, "--backend", backend]
        command += ["--blocks", str(blocks), "--calls", str(calls), "--logits", path]
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=_child_env())
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"]
            raised = [line for line in lines if EXCEPTION_LINE.match(line)] or lines
            raise RuntimeError(
                f"the {mode} step process failed ({backend}, fullgraph=True): {raised[-1]}\n" + "\n".join(lines[-12:])
            )
        report = json.loads(done.stdout.strip().splitlines()[-1])
        if report["patched"] != (mode == "patched"):
            raise RuntimeError(f"the {mode} process reports rope_patch patched={report['patched']}")
        return report, torch.load(path)


def measure(rounds: int = 5, backend: str = "eager", blocks: int = 30, calls: int = 20) -> dict:
    """mode -> list of per-process medians (us per step), rotating the
    order each round; raises if a process's logits differ from the first
    process's (or as :func:`step`)."""
    import torch

    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    first = None
    for round_ in range(rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            report, logits = step(mode, backend, blocks, calls)
            if first is None:
                first = logits
            elif not torch.equal(logits, first):
                raise RuntimeError(f"round {round_}: the {mode} logits differ from the first process's")
            results[mode].append(report["step_us"])
    return results


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("ROPE_PATCH_DISABLE", None)  # the patched mode patches explicitly; nothing else may
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--blocks", type=int, default=30, help="timed blocks per process")
    parser.add_argument("--calls", type=int, default=20, help="steps per block")
    parser.add_argument("--inside", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        print(json.dumps(inside(args.inside, args.backend, args.blocks, args.calls, args.logits)))
        return 0
    import torch
    import transformers

    results = measure(args.rounds, args.backend, args.blocks, args.calls)
    unpatched, patched = (statistics.median(results[mode]) for mode in MODES)
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}; backend {args.backend}, "
        f"fullgraph=True; one thread; {args.rounds} rounds of one process per mode"
    )
    # measure() raised unless every process's logits equal the first one's.
    print("| step | unpatched us | patched us | unpatched / patched | per-round ratios | logits |")
    print("|---|---|---|---|---|---|")
    ratios = ", ".join(f"{u / p:.3f}" for u, p in zip(results["unpatched"], results["patched"]))
    print(
        f"| Qwen3 {STEP_MODEL['num_hidden_layers']} layers, 1 token | {unpatched:.1f} | {patched:.1f} | "
        f"{unpatched / patched:.3f}x | {ratios} | identical in all {2 * args.rounds} processes |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
