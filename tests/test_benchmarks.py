"""The benchmark scripts keep working as the package changes: each one's
measuring function runs on a tiny budget (their own checks included: every
way of reading the extent reads the true one, patched outputs are
bit-identical to unpatched). Timings are not judged here."""

import os
import sys

import pytest
import torch

import rope_patch
from tests.models import transformers_major

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(autouse=True)
def _importable():
    sys.path.insert(0, BENCHMARKS)
    yield
    sys.path.remove(BENCHMARKS)


def test_bench_bounds_reads_the_true_extent_every_way():
    import bench_bounds

    rows = bench_bounds.measure("cpu", rounds=1, shapes=((1, 1), (2, 8)))
    ways = {row["way"] for row in rows}
    assert {"stack + tolist", "bounds (one kernel)", "bounds, a new tensor", "known (other table)"} <= ways
    assert all(row["us"] > 0 for row in rows)


def test_bench_rope_types_covers_both_states_of_both_types(patched, monkeypatch):
    import bench_rope_types

    monkeypatch.setattr(bench_rope_types, "SHAPES", ((1, 1),))
    rows = bench_rope_types.measure(torch.float32, rounds=1)
    assert [row[0] for row in rows] == list(bench_rope_types.CASES)
    assert all(plain > 0 and patched_us > 0 for _, _, plain, patched_us in rows)


def test_bench_catalog_times_a_class_and_lists_what_it_cannot(patched):
    import bench_catalog

    rows, skipped = bench_catalog.measure_catalog(torch.float32, rounds=1, pattern="llama")
    assert [name for name, *_ in rows][:1] == ["LlamaRotaryEmbedding"]
    assert not skipped
    # Patched, but computed unpatched at run time: listed with the reason.
    name = "GPTJRotaryEmbedding" if transformers_major() >= 5 else "EfficientLoFTRRotaryEmbedding"
    rows, skipped = bench_catalog.measure_catalog(torch.float32, rounds=1, pattern=name)
    assert not rows and [skipped_name for skipped_name, _ in skipped] == [name]


@pytest.fixture
def patched():
    assert rope_patch.patch()
    yield
    rope_patch.unpatch()


def test_bench_remote_runs_its_checks(tmp_path):
    """In a child (remote code needs HF_MODULES_CACHE before transformers is
    imported): --quick runs every part, with its identity checks."""
    import subprocess

    from tests.conftest import subprocess_env

    script = os.path.join(BENCHMARKS, "bench_remote.py")
    result = subprocess.run(  # the return code is checked below
        [sys.executable, script, "--quick"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr
    assert "ms/step" in result.stdout and "shared by [2]" in result.stdout


def test_bench_no_grad_times_the_three_forwards_of_every_row(capsys):
    import bench_no_grad

    assert bench_no_grad.main(["--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| qwen3", "| llama3"))]
    assert len(rows) == 2 * 2 * len(bench_no_grad.SHAPES)
    assert all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[3:6])
    assert not rope_patch.is_patched()  # it unpatched what it patched


def test_bench_compile_times_both_modes_in_processes_of_their_own():
    import bench_compile

    from tests.conftest import unpatched_or_skip

    unpatched_or_skip("bench_compile's fullgraph step", lambda: bench_compile.step("unpatched", blocks=1, calls=1))
    results = bench_compile.measure(rounds=1, blocks=1, calls=1)
    assert set(results) == {"unpatched", "patched"}
    assert all(len(values) == 1 and values[0] > 0 for values in results.values())
    assert not rope_patch.is_patched()  # the patching happened in a child process only


def test_gpu_check_cpu_smoke_runs_every_part():
    """benchmarks/gpu_check.py --cpu-smoke (its parts live in
    benchmarks/harness/gpu/): no bit-identity failure, no part raised, and
    every part complete but those the unpatched model itself cannot do on
    this torch + transformers (the compile part on the floor)."""
    import subprocess

    from tests.conftest import subprocess_env

    result = subprocess.run(  # the return code is checked below
        [sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--cpu-smoke", "--budget", "60"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    output = result.stdout + result.stderr
    incomplete = [line.strip() for line in output.splitlines() if line.strip().startswith("INCOMPLETE ")]
    assert "  bit-identity failures: 0" in output, output[-3000:]
    assert all("the unpatched model itself does not" in line for line in incomplete), incomplete
    assert result.returncode == (3 if incomplete else 0), output[-3000:]
    assert f"== exit status {result.returncode}" in output
