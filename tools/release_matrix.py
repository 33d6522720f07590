"""The contract over torch and transformers releases, one virtual environment
each, as one table (not part of CI: minutes per pair, and a 2-3.5 GB torch
download per torch minor the first time).

The venvs are nox sessions (``noxfile.py``, uv makes them and its cache
keeps the torch builds between runs; each venv is removed after its run):

    nox -t torch-matrix       every torch minor from the floor (2.4) to the
                              newest, each with 4.57.6 and, from torch 2.6
                              (what transformers 5 needs), the newest 5.x
    nox -t release-matrix     4.57.6 and every 5.x minor's newest patch, torch 2.13.0
    nox -s "torch-matrix(torch2.8.0-transformers5.25.0)"    one pair
    nox -s matrix-table [-- --md]                           the table

Each session installs torch, this checkout with its test extra (what CI
installs) and the transformers release. When that release cannot be
installed with its requirements, the rest is installed for the newest
release below it and the release itself over it with ``--no-deps``; the NOT
INSTALLABLE column says what was missing. Then, inside the venv, this file
with ``--inside``: the contract itself, from the test suite: every rotary
class through ``tests/test_contract.py``'s ``contract_outcomes`` (verify_class:
fp32, bf16, fp16, every position pattern, 2-D and 3-D, first use and from
the table, against the unpatched forward), and every class computed through
``dynamic_rope_update`` with a dynamic and a longrope config
(``tests/test_contract_rope_types.py``: verify_rope_type). Its JSON lands in
the results folder (``ROPE_PATCH_MATRIX_RESULTS``, default
``~/.cache/rope-patch/release-matrix``) as ``torch-T_transformers-V.json``.

    python tools/release_matrix.py table [DIR] [--md]

prints one row per result file:

    TORCH  TRANSFORMERS  CLASSES  FROM TABLES  M-ROPE  ROPE-TYPE CHECKS  MISMATCHES  NOT BUILT  NOT INSTALLABLE  DATE

CLASSES: rotary classes found; FROM TABLES: classes answered from tables
(M-RoPE ones included; M-ROPE counts those); ROPE-TYPE CHECKS: classes
checked with a dynamic config plus those checked with a longrope one;
MISMATCHES: classes whose patched forward differed from the unpatched one
(a plugin problem); NOT BUILT: classes whose default config that release
cannot instantiate even unpatched (an upstream bug or a missing optional
package: not proven there). Both are listed below the table. Exit status 1
when a result has a mismatch or could not be run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

DEFAULT_RESULTS = os.environ.get(
    "ROPE_PATCH_MATRIX_RESULTS", os.path.join(os.path.expanduser("~"), ".cache", "rope-patch", "release-matrix")
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def run_contract() -> dict:
    """Inside a release's venv: the contract over every class (``--inside``)."""
    started = time.monotonic()
    sys.path.insert(0, ROOT)
    import torch
    import transformers

    import rope_patch
    from rope_patch.diagnostics.verify import verify_rope_type
    from rope_patch.status import Status
    from tests import test_contract, test_contract_rope_types

    outcomes = test_contract.contract_outcomes()
    mismatches, not_built = {}, {}
    for rotary, result in outcomes.items():
        if result.status is not Status.UNSUPPORTED and not result.built:
            not_built[rotary.name] = " ".join(result.reason.split())[:300]
        if result.problems:
            mismatches[rotary.name] = "; ".join(result.problems)[:300]
    checked = 0
    assert rope_patch.patch()
    try:
        for rope_type in test_contract_rope_types.CHANGING:
            for rotary in test_contract_rope_types.CATALOG:
                result = verify_rope_type(rotary, rope_type)
                checked += result is not None
                if result is not None and result.problems:
                    mismatches[f"{rotary.name} ({rope_type})"] = "; ".join(result.problems)[:300]
    finally:
        rope_patch.unpatch()
    cached = [r for r in outcomes.values() if r.status is Status.CACHED]
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "classes": len(outcomes),
        "cached": len(cached),
        "mrope": sum(r.mrope for r in cached),
        "rope_type_checks": checked,
        "mismatches": mismatches,
        "not_built": not_built,
        "seconds": round(time.monotonic() - started),
    }


def render(rows: list[dict], markdown: bool = False) -> list[str]:
    header = ("TORCH", "TRANSFORMERS", "CLASSES", "FROM TABLES", "M-ROPE", "ROPE-TYPE CHECKS", "MISMATCHES")
    header += ("NOT BUILT", "NOT INSTALLABLE", "DATE")
    table = [header]
    for row in rows:
        torch = row.get("torch", row.get("torch_requested", "?"))
        if "error" in row:
            table.append(
                (torch, row["version"], "-", "-", "-", "-", "not run", "-", row["error"][:100], row.get("date", ""))
            )
            continue
        counts = (row["classes"], row["cached"], row["mrope"], row["rope_type_checks"], len(row["mismatches"]))
        counts += (len(row["not_built"]),)
        cells = (*map(str, counts), row.get("not_installable") or "-", row.get("date", ""))
        table.append((torch, row["version"], *cells))
    if markdown:
        lines = ["| " + " | ".join(cell.lower() if line is header else cell for cell in line) + " |" for line in table]
        lines.insert(1, "|" + "---|" * len(header))
        return lines
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]


def load(folder: str) -> list[dict]:
    rows = []
    for path in glob.glob(os.path.join(folder, "torch-*_transformers-*.json")):
        with open(path) as stream:
            rows.append(json.load(stream))
    return sorted(rows, key=lambda row: (release(row.get("torch_requested", "0")), release(row["version"])))


def table(folder: str, markdown: bool) -> int:
    rows = load(folder)
    if not rows:
        print(f"no results in {folder} (run: nox -t torch-matrix, nox -t release-matrix)")
        return 1
    for line in render(rows, markdown):
        print(line)
    failed = False
    for row in rows:
        pair = f"torch {row.get('torch', row.get('torch_requested'))} + transformers {row['version']}"
        for name, problem in row.get("mismatches", {}).items():
            print(f"  {pair}: MISMATCH {name}: {problem}")
            failed = True
        for name, reason in row.get("not_built", {}).items():
            print(f"  {pair}: not built {name}: {reason[:200]}")
        if "error" in row:
            print(f"  {pair}: not run: {row['error']}")
            failed = True
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv == ["--inside"]:
        print(json.dumps(run_contract()))
        return 0
    if argv[:1] == ["table"]:
        markdown = "--md" in argv
        folders = [arg for arg in argv[1:] if arg != "--md"]
        return table(folders[0] if folders else DEFAULT_RESULTS, markdown)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
