"""The contract over a list of transformers releases, one virtual environment
each, as one table (not part of CI: it takes minutes per release).

    python tools/release_matrix.py [VERSION ...] [--cache DIR] [--torch SPEC] [--keep]

VERSIONs default to the newest patch of 4.57 and of every 5.x minor the
registry lists (``pip index versions transformers``). For each release, one
after another: a venv under the cache folder (printed; default
``~/.cache/rope-patch/release-matrix``) with ``torch==2.13.0``, this checkout
installed editable with its test extra (what CI installs) and
``transformers==VERSION``. When pip cannot install that release with its
requirements (5.25.0 requires ``kernels>=0.19.1,<0.20``, which the registry
does not have), the rest is installed for the newest release below it and
the release itself over it with ``--no-deps``; the NOT INSTALLABLE column
says what was missing.

In that venv, the contract itself, from the test suite: every rotary class
through ``tests/test_contract.py``'s ``contract_outcome`` (verify_class:
fp32, bf16, fp16, every position pattern, 2-D and 3-D, first use and from
the table, against the unpatched forward), and every class computed through
``dynamic_rope_update`` with a dynamic and a longrope config
(``tests/test_contract_rope_types.py``: verify_rope_type). One row per
release:

    TRANSFORMERS  CLASSES  FROM TABLES  M-ROPE  ROPE-TYPE CHECKS  MISMATCHES  NOT BUILT  NOT INSTALLABLE

CLASSES: rotary classes found; FROM TABLES: classes answered from tables
(M-RoPE ones included; M-ROPE counts those); ROPE-TYPE CHECKS: classes
checked with a dynamic config plus those checked with a longrope one;
MISMATCHES: classes whose patched forward differed from the unpatched one
(a plugin problem); NOT BUILT: classes whose default config that release
cannot instantiate even unpatched (an upstream bug or a missing optional
package: not proven there). Both are listed below the table, and each
release's results are written to ``transformers-VERSION.json`` in the cache
folder. Each venv is removed after its run unless ``--keep``. Exit status 1
when a release has a mismatch or could not be run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rope-patch", "release-matrix")
PIP = ("-m", "pip", "install", "-q", "--disable-pip-version-check")


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def listed_versions(python=sys.executable) -> list[str]:
    """Every transformers release the registry lists, newest first."""
    out = subprocess.run(
        [python, "-m", "pip", "index", "versions", "transformers", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"^Available versions: (.*)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"no versions in pip index's answer: {out!r}")
    return [v.strip() for v in match.group(1).split(",") if re.fullmatch(r"\d+(\.\d+)*", v.strip())]


def default_versions() -> list[str]:
    """The newest patch of 4.57 and of every 5.x minor, oldest first."""
    newest: dict[tuple[int, ...], str] = {}
    for version in listed_versions():
        minor = release(version)[:2]
        if (minor == (4, 57) or minor[0] == 5) and release(version) > release(newest.get(minor, "0")):
            newest[minor] = version
    return [newest[minor] for minor in sorted(newest)]


def missing_requirement(pip_output: str) -> str:
    """What pip could not find, from its error (or its last line)."""
    match = re.search(r"satisfies the requirement (\S+)", pip_output)
    if match:
        return f"{match.group(1)} not on the registry"
    lines = [line for line in pip_output.splitlines() if line.startswith("ERROR")]
    return (lines or pip_output.strip().splitlines() or ["pip failed"])[-1][:120]


def install(folder: str, version: str, torch_spec: str, log) -> str:
    """A venv in ``folder`` with torch, this checkout [test] and
    transformers==version. Returns what was not installable ("" if nothing)."""
    shutil.rmtree(folder, ignore_errors=True)
    venv.create(folder, with_pip=True)
    python = os.path.join(folder, "bin", "python")
    base = [python, *PIP, torch_spec, "-e", f"{ROOT}[test]"]
    attempt = subprocess.run([*base, f"transformers=={version}"], capture_output=True, text=True, check=False)
    log.write(attempt.stdout + attempt.stderr)
    if attempt.returncode == 0:
        return ""
    missing = missing_requirement(attempt.stderr)
    major = release(version)[0]
    below = subprocess.run([*base, f"transformers>={major},<{version}"], capture_output=True, text=True, check=False)
    log.write(below.stdout + below.stderr)
    if below.returncode != 0:
        why = missing_requirement(below.stderr)
        raise RuntimeError(f"no installable transformers {major}.x below {version}: {why}")
    subprocess.run([python, *PIP, "--no-deps", f"transformers=={version}"], check=True, stdout=log, stderr=log)
    return f"{missing}; installed with --no-deps"


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


def render(rows: list[dict]) -> list[str]:
    header = ("TRANSFORMERS", "CLASSES", "FROM TABLES", "M-ROPE", "ROPE-TYPE CHECKS", "MISMATCHES", "NOT BUILT")
    header += ("NOT INSTALLABLE",)
    table = [header]
    for row in rows:
        if "error" in row:
            table.append((row["version"], "-", "-", "-", "-", "not run", "-", row["error"][:100]))
            continue
        counts = (row["classes"], row["cached"], row["mrope"], row["rope_type_checks"], len(row["mismatches"]))
        counts += (len(row["not_built"]),)
        cells = (*counts, row["not_installable"] or "-")
        table.append((row["version"], *map(str, cells)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help="transformers releases (default: 4.57 and every 5.x minor)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="folder for the venvs (default %(default)s)")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep each venv after its run")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        print(json.dumps(run_contract()))
        return 0

    versions = args.versions or default_versions()
    os.makedirs(args.cache, exist_ok=True)
    print(f"transformers {', '.join(versions)}; {args.torch}; venvs under {args.cache}", flush=True)
    rows = []
    for version in versions:
        folder = os.path.join(args.cache, f"transformers-{version}")
        row = {"version": version}
        started = time.monotonic()
        with open(folder + ".log", "w") as log:
            try:
                row["not_installable"] = install(folder, version, args.torch, log)
                env = dict(os.environ, PYTHONPATH=ROOT, TRANSFORMERS_VERBOSITY="error")
                env = {k: v for k, v in env.items() if not k.startswith("ROPE_PATCH_")}
                python = os.path.join(folder, "bin", "python")
                done = subprocess.run(
                    [python, os.path.abspath(__file__), "--inside"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"the contract run exited {done.returncode} (see {log.name})")
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            except (RuntimeError, subprocess.CalledProcessError, ValueError, IndexError) as error:
                row["error"] = str(error)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        with open(folder + ".json", "w") as stream:
            json.dump(row, stream, indent=1)
        rows.append(row)
        took = round(time.monotonic() - started)
        print(f"  {render([row])[1]}  ({took} s{', ' + row['torch'] if 'torch' in row else ''})", flush=True)

    print()
    for line in render(rows):
        print(line)
    failed = False
    for row in rows:
        for name, problem in row.get("mismatches", {}).items():
            print(f"  {row['version']}: MISMATCH {name}: {problem}")
            failed = True
        for name, reason in row.get("not_built", {}).items():
            print(f"  {row['version']}: not built {name}: {reason[:200]}")
        failed = failed or "error" in row
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
