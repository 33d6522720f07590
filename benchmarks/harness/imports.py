"""Import cost of ``rope_patch.auto``: fresh interpreters importing
transformers with and without it, alternating, and the modules it adds.
Imports rope_patch from the source checkout (``benchmarks/..``)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from harness.common import REPO


@dataclasses.dataclass
class ImportRow:
    """Wall time of importing transformers with and without rope_patch.auto.

    Attributes:
        base_ms: ``python -c "import transformers"``, median.
        patched_ms: ``python -c "import transformers, rope_patch.auto"``, median.
        added_ms: median of the per-pair differences.
        in_process_ms: ``import rope_patch.auto`` timed inside the
            interpreter after ``import transformers``, median over ``runs``.
        runs: pairs run (alternating).
        modeling_modules: modeling modules ``import rope_patch.auto``
            imported (after ``import transformers``); must be empty.
        new_modules: how many modules ``import rope_patch.auto`` added.
    """

    base_ms: float
    patched_ms: float
    added_ms: float
    in_process_ms: float
    runs: int
    modeling_modules: list[str]
    new_modules: int


_NEW_MODULES = (
    "import sys, json, time, transformers; before = set(sys.modules); start = time.perf_counter(); "
    "import rope_patch.auto; elapsed = time.perf_counter() - start; "
    "print(json.dumps([elapsed * 1e3, sorted(set(sys.modules) - before)]))"
)


def import_cost(
    python: str | None = None,
    runs: int = 20,
    repo_root: str = REPO,
    progress: Callable[[str], None] | None = None,
) -> ImportRow:
    """Time ``runs`` alternating pairs of fresh interpreters (``python``,
    default this one) importing transformers with and without
    ``rope_patch.auto``, with ``repo_root`` first on PYTHONPATH; then list
    the modules rope_patch.auto adds."""
    python = python or sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    env.pop("ROPE_PATCH_DISABLE", None)
    commands = {"base": "import transformers", "patched": "import transformers, rope_patch.auto"}

    def wall(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([python, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
        return (time.perf_counter() - start) * 1e3

    for code in commands.values():  # warm the file cache
        wall(code)
    times = {name: [] for name in commands}
    for index in range(runs):
        order = list(commands) if index % 2 == 0 else list(reversed(commands))
        for name in order:
            times[name].append(wall(commands[name]))
    added = [p - b for p, b in zip(times["patched"], times["base"])]
    in_process = []
    for _ in range(runs):
        listing = subprocess.run([python, "-c", _NEW_MODULES], env=env, check=True, capture_output=True, text=True)
        elapsed_ms, new = json.loads(listing.stdout.strip().splitlines()[-1])
        in_process.append(elapsed_ms)
    row = ImportRow(
        base_ms=statistics.median(times["base"]),
        patched_ms=statistics.median(times["patched"]),
        added_ms=statistics.median(added),
        in_process_ms=statistics.median(in_process),
        runs=runs,
        modeling_modules=[name for name in new if name.startswith("transformers.models.") or ".modeling_" in name],
        new_modules=len(new),
    )
    if progress:
        progress(
            f"import: {row.base_ms:.0f} ms -> {row.patched_ms:.0f} ms ({row.added_ms:+.1f} ms; "
            f"in-process {row.in_process_ms:.1f} ms)"
        )
    return row
