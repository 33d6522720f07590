"""Contract test: every rotary class transformers ships is found, and every
one whose forward rope_patch can cache builds from its default config and
answers the probe forward.

The catalog is computed once, when this module is collected (importing every
modeling module takes a few seconds), so the parametrized test has one case
per eligible class. A class that cannot be built FAILS the test unless its
error matches INSTANTIATION_ALLOWANCES; a probe forward that fails is an
xfail whose reason is the error, so nothing is skipped silently. The summary
line "instantiated N / M eligible" is printed at the end of the run.
"""

from __future__ import annotations

import re

import pytest
import transformers

from rope_patch import catalog

CATALOG = catalog.scan_catalog()
ELIGIBLE = [rotary for rotary in CATALOG.rotaries if rotary.unsupported is None]
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: Fewest classes the scan must find: transformers 4.57 ships 110, 5.24 ships 227.
MIN_CLASSES = 200 if TRANSFORMERS_MAJOR >= 5 else 101

#: Instantiation errors that are accepted (xfail instead of fail), as
#: ``(regex on the InstantiationError message, why it is acceptable)``.
#: Keyed on the error, never on a model name, so a new model that fails for
#: an unlisted reason fails the test. Empty: on transformers 4.57.6 and
#: 5.24.0 every eligible class builds (three default configs with empty RoPE
#: parameters are repaired by catalog.with_standard_rope). An entry belongs
#: here only for a failure no generic strategy can fix, e.g. a constructor
#: that needs a runtime object no config provides.
INSTANTIATION_ALLOWANCES: tuple[tuple[str, str], ...] = ()

#: Outcome counts for the end-of-run summary.
_RESULTS = {"run": 0, "instantiated": 0}


def _case_id(rotary) -> str:
    return f"{rotary.model_type}.{rotary.name}"


def _allowance(message: str) -> str | None:
    """The justification of the first allowance whose pattern matches ``message``."""
    for pattern, why in INSTANTIATION_ALLOWANCES:
        if re.search(pattern, message):
            return why
    return None


class _Summary:
    """Plugin object printing the instantiation count in the terminal summary."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(
            f"rope_patch catalog: instantiated {_RESULTS['instantiated']} / {len(ELIGIBLE)} eligible "
            f"({_RESULTS['run']} run, transformers {transformers.__version__})"
        )


@pytest.fixture(scope="module", autouse=True)
def _report_summary(request):
    """Register _Summary once per run (the terminal summary hook runs later)."""
    manager = request.config.pluginmanager
    if not manager.has_plugin("rope_patch_catalog_summary"):
        manager.register(_Summary(), "rope_patch_catalog_summary")
    yield


def test_catalog_finds_rotary_classes():
    """The scan finds the rotary classes, and every module it could not
    import is listed with an ImportError (a missing optional dependency such
    as torchaudio), not some other exception that would hide a bug."""
    assert len(CATALOG.rotaries) >= MIN_CLASSES, f"only {len(CATALOG.rotaries)} rotary classes found"
    for failure in CATALOG.failures:
        print(f"not imported: {failure.module}: {failure.reason}")
    unexpected = [f"{f.module}: {f.reason}" for f in CATALOG.failures if not isinstance(f.error, ImportError)]
    assert not unexpected, "modules failed to import for reasons other than missing dependencies:\n" + "\n".join(
        unexpected
    )
    names = {(r.module, r.name) for r in CATALOG.rotaries}
    assert len(names) == len(CATALOG.rotaries), "a class was listed twice"


def _instance_or_fail(rotary):
    """catalog.default_instance(rotary), or fail the test (xfail when an
    allowance matches the error)."""
    try:
        return catalog.default_instance(rotary)
    except catalog.InstantiationError as exc:
        message = str(exc)  # failing outside the handler keeps the report to this one line
    why = _allowance(message)
    if why is None:
        pytest.fail(f"cannot instantiate: {message}", pytrace=False)
    pytest.xfail(f"cannot instantiate ({why}): {message}")


@pytest.mark.parametrize("rotary", ELIGIBLE, ids=_case_id)
def test_default_instance_and_forward(rotary):
    """The class builds from its default config and its unpatched forward
    returns tensors for x of shape (1, 4, 8), 2-D positions and each layer type."""
    _RESULTS["run"] += 1
    instance = _instance_or_fail(rotary)
    _RESULTS["instantiated"] += 1

    assert not instance.training, "default_instance must return an eval-mode module"
    layer_types = catalog.layer_types_of(instance)
    assert layer_types, "layer_types_of returned nothing"
    problems = [p for p in (catalog.probe_problem(rotary, instance, t) for t in layer_types) if p]
    if problems:
        pytest.xfail("forward fails on the probe inputs: " + "; ".join(problems))
