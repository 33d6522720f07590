"""Versions for .ci/run: the floor it must test, and what each line tested
against what the registry lists. Standard library, plus ``packaging`` (pip's
own copy where it is not installed).

    python .ci/versions.py floor
        The floor line's requirements, from pyproject.toml's lowest torch and
        transformers: ``torch==2.4.* transformers==4.57.*`` (pip then picks
        the newest patch of each floor minor). Exits 1 when pyproject.toml
        and rope_patch/versions.py (what ``rope-patch info`` states) disagree
        on the floor: CI would no longer test what the package claims.

    python .ci/versions.py report NAME TORCH_SPEC TRANSFORMERS_SPEC
        Run with a line's venv interpreter, after its install: prints (on
        stderr) the torch and transformers versions installed and the newest
        of each on the registry (overall and within the line's spec). On
        stdout: the newest transformers within TRANSFORMERS_SPEC when it is
        newer than the installed one (pip could not resolve it), else
        nothing. A failed registry query is printed, not fatal.

    python .ci/versions.py newest PACKAGE
        The newest release of PACKAGE the registry lists (the torch-newest
        line's torch). Exits 1 when the registry cannot be asked.

    python .ci/versions.py why NAME VERSION
        Why pip does not install transformers==VERSION here: the first
        error line of a dry run (on stderr).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pyproject_floors() -> dict[str, tuple[int, ...]]:
    """{"torch": (2, 4), "transformers": (4, 57)} from pyproject.toml's
    ``dependencies`` (its lower bounds)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as stream:
        text = stream.read()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    floors = {}
    for requirement in re.findall(r'"([^"]+)"', block.group(1) if block else ""):
        parsed = Requirement(requirement)
        if parsed.name in ("torch", "transformers"):
            lows = [spec.version for spec in parsed.specifier if spec.operator == ">="]
            if lows:
                floors[parsed.name] = Version(lows[0]).release
    return floors


def claimed_floors() -> dict[str, tuple[int, ...]]:
    """rope_patch.versions.SUPPORTED's lower bounds (the module is loaded
    from its file: importing rope_patch needs its dependencies)."""
    spec = importlib.util.spec_from_file_location("_versions", os.path.join(ROOT, "rope_patch", "versions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: low for name, (low, _) in module.SUPPORTED.items()}


def floor() -> int:
    floors, claimed = pyproject_floors(), claimed_floors()
    for name in ("torch", "transformers"):
        if name not in floors:
            say(f"pyproject.toml states no lower bound for {name}")
            return 1
        if floors[name] != claimed.get(name):
            say(f"pyproject.toml's {name} floor {floors[name]} is not rope_patch/versions.py's {claimed.get(name)}")
            return 1
    print(" ".join(f"{name}=={'.'.join(map(str, floors[name][:2]))}.*" for name in ("torch", "transformers")))
    return 0


def listed(package: str) -> list[Version]:
    """The releases the registry lists (pip's configured indexes), newest first."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    match = re.search(r"^Available versions: (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise RuntimeError(f"pip index versions {package}: {lines[-1] if lines else f'exit {out.returncode}'}")
    return sorted({Version(v.strip()) for v in match.group(1).split(",")}, reverse=True)


def newest(versions: list[Version], spec: str) -> Version | None:
    specifier = Requirement(spec).specifier
    return next((v for v in versions if specifier.contains(v)), None)


def report(name: str, torch_spec: str, transformers_spec: str) -> int:
    installed = {package: importlib.metadata.version(package) for package in ("torch", "transformers")}
    say(
        f"=== {name}: tested torch {installed['torch']} ({torch_spec}), "
        f"transformers {installed['transformers']} ({transformers_spec})"
    )
    registry = []
    newer = None
    try:
        for package, spec in (("torch", torch_spec), ("transformers", transformers_spec)):
            versions = listed(package)
            in_spec = newest(versions, spec)
            registry.append(f"newest {package} {versions[0]}, newest in {spec}: {in_spec}")
            if package == "transformers" and in_spec is not None and in_spec > Version(installed[package]):
                newer = in_spec
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
        say(f"=== {name}: registry query failed ({error}): the newest releases are unknown here, not checked")
        return 0
    say(f"=== {name}: registry: {'; '.join(registry)}")
    if newer is not None:
        say(f"=== {name}: pip resolved transformers {installed['transformers']}, not {newer}, the newest in the line")
        print(newer)
    else:
        say(f"=== {name}: transformers {installed['transformers']} is the newest release in {transformers_spec}")
    return 0


def newest_release(package: str) -> int:
    try:
        print(listed(package)[0])
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
        say(f"the newest {package} is unknown: {error}")
        return 1
    return 0


def why(name: str, version: str) -> int:
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--disable-pip-version-check"]
    out = subprocess.run(
        [*command, f"transformers=={version}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    errors = [line for line in (out.stderr + out.stdout).splitlines() if line.startswith("ERROR")]
    reason = errors[0].split(" (from versions:")[0] if errors else f"pip's dry run exits {out.returncode}, no error"
    say(f"=== {name}: pip on transformers=={version}: {reason[:300]}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["floor"] and len(argv) == 1:
        return floor()
    if argv[:1] == ["report"] and len(argv) == 4:
        return report(*argv[1:])
    if argv[:1] == ["newest"] and len(argv) == 2:
        return newest_release(argv[1])
    if argv[:1] == ["why"] and len(argv) == 3:
        return why(*argv[1:])
    say(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
