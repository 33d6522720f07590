"""Shared fixtures: a clean environment, patching set up and torn down per
test, and the one comparison every test uses."""

from __future__ import annotations

import collections
import os

import pytest
import torch
import transformers

import rope_patch
from rope_patch import settings
from rope_patch.diagnostics.verify import module_state  # noqa: F401 - shared with the tests
from rope_patch.identity import difference

ROPE_VARIABLES = tuple(settings.VARIABLES)

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No ROPE_PATCH_* variable leaks in from the caller's shell, and every
    test leaves the process unpatched."""
    for name in ROPE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    if rope_patch.is_patched():
        rope_patch.unpatch()


@pytest.fixture
def patched():
    """Patching active for the duration of one test."""
    assert rope_patch.patch()
    yield
    rope_patch.unpatch()


def unpatched(module, *args):
    """What the unpatched forward returns (the original function, run through
    rope_patch.disabled())."""
    with rope_patch.disabled():
        return module(*args)


def unpatched_or_skip(feature, run):
    """``run()``, the unpatched path of a torch or transformers feature a test
    exercises (compile, export, ONNX, continuous batching, ...), called with
    nothing patched; its result is returned (tests use it as their
    reference). Where the feature fails even so, the installed torch or
    transformers cannot do it and the test is skipped with that reason and
    the versions: a test of rope_patch under that feature would prove
    nothing there. Only the unpatched path is judged, so a skip never hides
    a plugin failure: once it works, the test runs as before.

    Args:
        feature: what is exercised, for the skip reason.
        run: the unpatched path; it builds what it needs.
    """
    assert not rope_patch.is_patched(), "call unpatched_or_skip before patching: only the unpatched path is judged"
    try:
        return run()
    except Exception as error:  # any failure of the unpatched path: the feature is missing here
        first_line = (str(error).strip().splitlines() or [""])[0][:160].rstrip(" {(")
        reason = (
            f"{feature} fails unpatched on torch {torch.__version__} + transformers {transformers.__version__}: "
            f"{type(error).__name__}: {first_line}"
        )
        # Reported at the test's own location, as a skipif mark is, not at this line.
        raise pytest.skip.Exception(reason, _use_item_location=True) from error


def assert_identical(expected, actual):
    """Bit-identical: same type, dtype, shape, device, strides and bits."""
    problem = difference(expected, actual)
    assert problem is None, problem


def assert_same_outcome(module, *args):
    """The patched call returns what the unpatched call returns (twice: first
    use, then from the table), or raises the same exception type."""
    try:
        expected = unpatched(module, *args)
    except Exception as error:  # noqa: BLE001
        with pytest.raises(type(error)):
            module(*args)
        return
    for _ in range(2):
        assert_identical(expected, module(*args))


def subprocess_env(**extra):
    """Environment for a child Python: this checkout importable, no
    ROPE_PATCH_* from the parent unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ROPE_VARIABLES}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cpu_threads():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_terminal_summary(terminalreporter):
    """Print the contract test's coverage, when its coverage test ran (the
    lines travel as a user property, so this works under pytest-xdist too)."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, lines in getattr(report, "user_properties", ()):
            if name == "rope_patch_coverage" and report.when == "call":
                terminalreporter.write_line("")
                for line in lines:
                    terminalreporter.write_line(line)


def table_info(module, dtype=torch.float32, layer_type=None, device="cpu"):
    """The TableInfo of ``module`` for one (device, dtype, layer_type), or None."""
    for table in rope_patch.cache_info(module).tables:
        if (table.device, table.dtype, table.layer_type) == (torch.device(device), dtype, layer_type):
            return table
    return None


def held_bytes(module) -> int:
    """Bytes of every table ``module`` holds."""
    return rope_patch.cache_info(module).bytes


def answered(module) -> bool:
    """Some call of ``module`` was answered from a verified table."""
    return rope_patch.cache_info(module).answered


def answered_forms(module) -> set[str]:
    """The position layouts ``module`` answered from tables ("2-D", "3-D", "M-RoPE")."""
    return {form for table in rope_patch.cache_info(module).tables for form in table.forms}


class TorchCalls(torch.overrides.TorchFunctionMode):
    """Counts the torch functions called inside it, by name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    @property
    def names(self) -> set[str]:
        return set(self.counts)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counts[getattr(func, "__name__", "")] += 1
        return func(*args, **(kwargs or {}))


class CallsCos(TorchCalls):
    """Records whether any torch ``cos`` ran: the unpatched forward computes
    one, an answer from a table does not."""

    @property
    def seen(self) -> bool:
        return "cos" in self.names
