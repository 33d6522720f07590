"""rope_patch.verify (behind ``rope-patch list --verify`` and the GPU check)
proves 2-D and 3-D forms, and reports a table that went wrong."""

import torch

from rope_patch import catalog, discovery, mrope, tables, verify
from tests.models import llama_rotary


def test_mrope_class_is_verified_in_both_forms(patched):
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    instance = catalog.default_instance(discovery.describe(modeling_qwen2_vl.Qwen2VLRotaryEmbedding))
    verdict = verify.verify_module(instance, catalog.layer_types_of(instance), "cpu", torch.bfloat16)
    assert verdict.problems == []
    assert verdict.cached and verdict.fallback is None
    assert 3 in mrope.answered_axes(instance)


def test_a_corrupted_table_is_reported(patched):
    module = llama_rotary()
    module(torch.randn(1, 2048, 8), torch.arange(2048)[None])  # every position verify uses: no regrowth
    (table,) = tables.state_of(module).tables.values()
    table.columns[0][7].add_(1.0)  # what a bug in the table code would look like
    verdict = verify.verify_module(module, (None,), "cpu", torch.float32)
    assert any("values differ" in problem for problem in verdict.problems), verdict
