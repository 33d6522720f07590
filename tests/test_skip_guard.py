"""conftest.unpatched_or_skip, the one guard that skips a test for what the
installed torch or transformers cannot do: it judges the unpatched path
only, so it refuses to run while anything is patched, returns the
unpatched result when the feature works, and skips (naming the versions)
only when the unpatched path itself fails."""

import pytest
import torch
import transformers

import rope_patch
from tests.conftest import unpatched_or_skip


def test_the_unpatched_result_is_returned():
    assert unpatched_or_skip("addition", lambda: 1 + 1) == 2


def test_a_failing_unpatched_path_skips_with_the_versions():
    def missing():
        raise TypeError("export() got an unexpected keyword argument 'dynamic_shapes'")

    with pytest.raises(pytest.skip.Exception) as skipped:
        unpatched_or_skip("an exporter", missing)
    reason = str(skipped.value)
    assert f"torch {torch.__version__} + transformers {transformers.__version__}" in reason
    assert reason.startswith("an exporter fails unpatched") and "TypeError: export()" in reason


def test_it_refuses_to_judge_while_patched(patched):
    assert rope_patch.is_patched()
    with pytest.raises(AssertionError, match="before patching"):
        unpatched_or_skip("anything", lambda: None)
