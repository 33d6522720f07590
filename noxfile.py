"""CI lines and the release matrix, as nox sessions (uv makes the venvs).

    nox -l                      list the sessions
    nox -s floor                one CI line (floor, transformers4, transformers5,
                                torch-newest, lint, wheel)
    nox -t ci                   every CI line (what `bash .ci/run` runs)
    nox -t torch-matrix         the contract on every torch minor x transformers line
    nox -s release-matrix       ... and on every transformers release (torch 2.13.0)
    nox -s matrix-table         the table of the matrix results

Each CI line installs torch and transformers into a fresh venv with uv and
runs the README's test command, ``python -m pytest`` (pytest's exit 5, no
tests collected, fails the line like any other failure). It prints the
torch and transformers it tested and the newest of each on the registry
(``.ci/versions.py report``) and, when ``ROPE_PATCH_CI_SUMMARY`` names a
file, appends its summary line there (``bash .ci/run`` prints them).

Wheels: uv's cache (``UV_CACHE_DIR``, default ``~/.cache/uv``) keeps every
torch build between runs (the floor's and the newest torch's are multi-GB
CUDA builds from the registry), so only a new release is downloaded. uv does
not read pip's configuration: the folders in ``PIP_FIND_LINKS`` are passed
to it as ``--find-links`` (this is how torch 2.13.0+cpu comes from a local
wheel folder instead of a 3 GB CUDA build), and pip's constraint files do
not apply (every torch here is pinned to one release).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["floor", "transformers4", "transformers5", "torch-newest", "lint", "wheel"]

ROOT = Path(__file__).resolve().parent
# The torch the 2.13 lines use: a CPU build in a local wheel folder here; an
# unpinned torch would be a multi-GB CUDA build from the registry.
TORCH = "2.13.0"
TRANSFORMERS4 = "transformers==4.57.*"
TRANSFORMERS5 = "transformers>=5,<6"
# The whole-catalogue contract, run on a newest release pip cannot resolve:
# every rotary class (fp32/bf16/fp16, 2-D and 3-D positions), the changing
# rope types, and the scan. None of them needs from_pretrained.
CONTRACT_TESTS = ("tests/test_contract.py", "tests/test_contract_rope_types.py", "tests/test_catalog.py")
# The lint line's commands, in the order they run (one place: add a checker here).
LINT_COMMANDS = (
    ("ruff", "check", "."),
    ("ruff", "format", "--check", "."),
    ("mypy",),
    ("lint-imports",),  # the layers of docs/design.md (pyproject.toml's [tool.importlinter])
)

# The release matrix: the newest patch of each torch minor from the floor
# on, with 4.57.6 and (torch >= 2.6, what transformers 5 requires) the newest
# 5.x; and every 5.x minor's newest patch on torch 2.13.0. Update by hand
# when a release comes out (`.ci/versions.py report` in each CI line names
# the newest torch and transformers on the registry).
MATRIX_TORCH = ("2.4.1", "2.5.1", "2.6.0", "2.7.1", "2.8.0", "2.9.1", "2.10.0", "2.11.0", "2.12.1", "2.13.0")
MATRIX_TORCH += ("2.14.1", "2.15.0")
MATRIX_TRANSFORMERS4 = "4.57.6"
MATRIX_TRANSFORMERS5 = "5.25.0"
RELEASES_5X = ("5.0.0", "5.1.0", "5.2.0", "5.3.0", "5.4.0", "5.5.4", "5.6.2", "5.7.0", "5.8.1", "5.9.0", "5.10.4")
RELEASES_5X += (
    "5.11.0",
    "5.12.1",
    "5.13.1",
    "5.14.1",
    "5.15.1",
    "5.16.1",
    "5.17.0",
    "5.18.0",
    "5.19.0",
    "5.20.2",
    "5.21.1",
    "5.22.2",
    "5.23.0",
)
RELEASES_5X += ("5.24.0", "5.25.0")
MATRIX_RESULTS = Path(
    os.environ.get("ROPE_PATCH_MATRIX_RESULTS", Path.home() / ".cache" / "rope-patch" / "release-matrix")
)


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3])


def torch_matrix() -> list[nox.param]:
    pairs = []
    for torch in MATRIX_TORCH:
        pairs.append((torch, MATRIX_TRANSFORMERS4))
        if release(torch) >= (2, 6):
            pairs.append((torch, MATRIX_TRANSFORMERS5))
    return [
        nox.param(torch, transformers, id=f"torch{torch}-transformers{transformers}") for torch, transformers in pairs
    ]


def find_links() -> list[str]:
    """pip's PIP_FIND_LINKS folders (space-separated), as uv arguments."""
    return [arg for link in os.environ.get("PIP_FIND_LINKS", "").split() for arg in ("--find-links", link)]


def install(session: nox.Session, *args: str) -> None:
    session.install(*find_links(), *args)


def install_on(session: nox.Session, torch_spec: str, *args: str) -> None:
    """``args`` with torch pinned to ``torch_spec`` in the same resolve, so
    that nothing they pull may move torch off the line's release."""
    install(session, *args, torch_spec)


def versions_py(*args: str, python: str = sys.executable) -> str:
    """``.ci/versions.py ARGS``'s standard output (its report goes to stderr)."""
    out = subprocess.run(
        [python, str(ROOT / ".ci" / "versions.py"), *args], check=True, stdout=subprocess.PIPE, text=True
    )
    return out.stdout.strip()


def summary(session: nox.Session, line: str) -> None:
    session.log(f"summary: {line}")
    path = os.environ.get("ROPE_PATCH_CI_SUMMARY")
    if path:
        with open(path, "a") as stream:
            stream.write(line + "\n")


def venv_python(session: nox.Session) -> str:
    return str(Path(session.virtualenv.location) / "bin" / "python")


def tested(session: nox.Session) -> str:
    """ "torch X + transformers Y", as installed in the session's venv."""
    code = 'import torch, transformers; print(f"torch {torch.__version__} + transformers {transformers.__version__}")'
    return subprocess.run(
        [venv_python(session), "-c", code], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip()


def uv() -> str:
    """The uv next to nox (the ``uv`` package), else the one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv") or "uv"


def pytest(session: nox.Session, name: str, started: float, *args: str) -> None:
    """The README's test command, streamed and logged, then the line's
    summary with pytest's last line ("N passed, M skipped ... in Ts"). A
    non-zero exit (5, nothing collected, included) fails the session."""
    log = Path(session.create_tmp()) / "pytest.log"
    script = 'python -m pytest "$@" 2>&1 | tee "$0"; exit "${PIPESTATUS[0]}"'
    failed = None
    try:
        session.run("bash", "-c", script, str(log), *args, external=True)
    except nox.command.CommandFailed as error:
        failed = error
    lines = log.read_text().splitlines() if log.exists() else []
    last = lines[-1].strip(" =") if lines else "no output"
    status = "" if failed is None else f"FAILED (pytest exit {failed.return_code}): "
    summary(session, f"{name}: {status}{last} ({round(time.monotonic() - started)} s)")
    if failed is not None:
        session.error(f"pytest: {last}")


def test_line(session: nox.Session, name: str, torch_spec: str, transformers_spec: str) -> None:
    started = time.monotonic()
    session.log(f"=== {name}: {torch_spec} {transformers_spec}")
    install_on(session, torch_spec, "-e", ".[test]", transformers_spec)
    # In the venv: the versions tested and the newest on the registry
    # (stderr); a newer release in the line that was not resolved (stdout).
    newer = versions_py("report", name, torch_spec, transformers_spec, python=venv_python(session))
    versions = tested(session)
    session.log(f"=== {name}: {versions}")
    pytest(session, f"{name}: {versions}", started)
    if newer:
        newest_contract(session, name, newer)


def newest_contract(session: nox.Session, name: str, version: str) -> None:
    """The contract on a release pip/uv did not resolve, installed over the
    line's venv without its requirements."""
    started = time.monotonic()
    session.log(f"=== {name}: transformers {version} is on the registry but was not resolved:")
    session.run("python", ".ci/versions.py", "why", name, version)
    session.log(
        f"=== {name}: installing transformers=={version} over this venv with --no-deps (without what it "
        "requires that the registry lacks; from_pretrained may refuse to run without it) and running the "
        f"whole-catalogue contract on it: {' '.join(CONTRACT_TESTS)}"
    )
    install(session, "--no-deps", f"transformers=={version}")
    pytest(session, f"{name}, newest {version} (--no-deps): {tested(session)}: contract", started, *CONTRACT_TESTS)


@nox.session(tags=["ci", "tests"], venv_params=["--seed"])
def floor(session: nox.Session) -> None:
    """The oldest torch and transformers pyproject.toml allows (newest patch of each floor minor)."""
    torch_spec, transformers_spec = versions_py("floor").split()
    test_line(session, "floor", torch_spec, transformers_spec)


@nox.session(tags=["ci", "tests"], venv_params=["--seed"])
def transformers4(session: nox.Session) -> None:
    """torch 2.13.0 + the newest 4.57.x."""
    test_line(session, "transformers4", f"torch=={TORCH}", TRANSFORMERS4)


@nox.session(tags=["ci", "tests"], venv_params=["--seed"])
def transformers5(session: nox.Session) -> None:
    """torch 2.13.0 + the newest 5.x (and the contract on a newer 5.x that does not resolve)."""
    test_line(session, "transformers5", f"torch=={TORCH}", TRANSFORMERS5)


@nox.session(name="torch-newest", tags=["ci", "tests"], venv_params=["--seed"])
def torch_newest(session: nox.Session) -> None:
    """The newest torch on the registry + the newest 5.x."""
    test_line(session, "torch-newest", f"torch=={versions_py('newest', 'torch')}", TRANSFORMERS5)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, mypy and lint-imports (LINT_COMMANDS), on torch 2.13.0 + the newest 5.x."""
    started = time.monotonic()
    install_on(session, f"torch=={TORCH}", "-e", ".[lint]", TRANSFORMERS5)
    session.run("ruff", "--version")
    for command in LINT_COMMANDS:
        session.run(*command)
    names = ", ".join(" ".join(command) for command in LINT_COMMANDS)
    summary(session, f"lint: {names} clean ({round(time.monotonic() - started)} s)")


@nox.session(tags=["ci"])
def wheel(session: nox.Session) -> None:
    """sdist, then the wheel from it; the wheel installed alone (torch 2.13.0, newest 5.x) and smoke-tested."""
    started = time.monotonic()
    work = Path(session.create_tmp()).resolve()
    shutil.rmtree(work / "dist", ignore_errors=True)
    shutil.rmtree(work / "run", ignore_errors=True)
    # uv build: the sdist, then the wheel built from that sdist (the wheel
    # only has what the sdist ships), each in an isolated build env.
    session.run(uv(), "build", "--quiet", "--out-dir", str(work / "dist"), str(ROOT), external=True)
    session.run("python", ".ci/check_dist.py", str(work / "dist"))
    wheels = sorted((work / "dist").glob("rope_patch-*.whl"))
    install_on(session, f"torch=={TORCH}", *map(str, wheels), TRANSFORMERS5)
    # From a folder outside the repository, isolated (-I: no script or current
    # folder, no PYTHONPATH on sys.path): rope_patch can only be the wheel's.
    (work / "run").mkdir()
    shutil.copy(ROOT / ".ci" / "smoke_wheel.py", work / "run")
    with session.chdir(work / "run"):
        session.run("python", "-I", "smoke_wheel.py", env={"PYTHONPATH": None})
    versions = tested(session)
    summary(session, f"wheel: {versions}: smoke test passed ({round(time.monotonic() - started)} s)")


def matrix_run(session: nox.Session, torch: str, transformers: str) -> None:
    """The contract (tools/release_matrix.py --inside) in a venv with torch and
    transformers; results in MATRIX_RESULTS/torch-T_transformers-V.json. The
    venv is removed afterwards (the wheels stay in uv's cache)."""
    started = time.monotonic()
    MATRIX_RESULTS.mkdir(parents=True, exist_ok=True)
    result_file = MATRIX_RESULTS / f"torch-{torch}_transformers-{transformers}.json"
    row: dict = {"torch_requested": torch, "version": transformers}
    python = venv_python(session)
    pip = [uv(), "pip", "install", "--python", python, *find_links()]
    base = [*pip, f"torch=={torch}", "-e", f"{ROOT}[test]"]
    try:
        attempt = subprocess.run([*base, f"transformers=={transformers}"], capture_output=True, text=True, check=False)
        row["not_installable"] = ""
        if attempt.returncode != 0:
            session.log(attempt.stderr[-2000:])
            missing = " ".join(attempt.stderr.strip().splitlines()[-3:])[:200]
            major = release(transformers)[0]
            below = subprocess.run([*base, f"transformers>={major},<{transformers}"], check=False)
            if below.returncode != 0:
                raise RuntimeError(f"no installable transformers {major}.x below {transformers}: {missing}")
            subprocess.run([*pip, "--no-deps", f"transformers=={transformers}"], check=True)
            row["not_installable"] = f"{missing}; installed with --no-deps"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROPE_PATCH_")}
        env.update(PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
        done = subprocess.run(
            [python, str(ROOT / "tools" / "release_matrix.py"), "--inside"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the contract run exited {done.returncode}")
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except (RuntimeError, subprocess.CalledProcessError, ValueError, IndexError) as error:
        row["error"] = str(error)
    finally:
        row["date"] = datetime.date.today().isoformat()
        row["host"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        row["wall_seconds"] = round(time.monotonic() - started)
        result_file.write_text(json.dumps(row, indent=1))
        shutil.rmtree(session.virtualenv.location, ignore_errors=True)
    session.log(f"{result_file}: {json.dumps({k: v for k, v in row.items() if k != 'not_built'})[:600]}")
    if "error" in row or row.get("mismatches"):
        session.error(f"torch {torch} + transformers {transformers}: {row.get('error') or row['mismatches']}")


@nox.session(name="torch-matrix", tags=["torch-matrix"])
@nox.parametrize(("torch", "transformers"), torch_matrix())
def torch_matrix_session(session: nox.Session, torch: str, transformers: str) -> None:
    """The contract on one torch minor x transformers line."""
    matrix_run(session, torch, transformers)


@nox.session(name="release-matrix", tags=["release-matrix"])
@nox.parametrize("transformers", [MATRIX_TRANSFORMERS4, *RELEASES_5X])
def release_matrix_session(session: nox.Session, transformers: str) -> None:
    """The contract on one transformers release, torch 2.13.0."""
    matrix_run(session, TORCH, transformers)


@nox.session(name="matrix-table", python=False)
def matrix_table(session: nox.Session) -> None:
    """The table of every matrix result in MATRIX_RESULTS (markdown with --md)."""
    session.run(
        sys.executable, str(ROOT / "tools" / "release_matrix.py"), "table", str(MATRIX_RESULTS), *session.posargs
    )
