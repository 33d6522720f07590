"""rope_patch.diagnostics.verify.verify_class (behind the contract test,
``rope-patch list --verify`` and the GPU check) proves 2-D and 3-D forms,
counts M-RoPE classes by their 3-D calls, and reports a table that went wrong."""

import torch

from rope_patch import discovery
from rope_patch.cache import engine
from rope_patch.diagnostics.verify import verify_class
from rope_patch.status import Status


def test_mrope_class_is_verified_in_both_forms(patched):
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    result = verify_class(discovery.describe(modeling_qwen2_vl.Qwen2VLRotaryEmbedding), "cpu", (torch.bfloat16,))
    assert result.problems == ()
    assert result.status is Status.CACHED and result.mrope


def test_a_corrupted_table_is_reported(patched, monkeypatch):
    from transformers.models.llama import modeling_llama

    original_build = engine.build_table

    def corrupted(*args, **kwargs):  # what a bug in the table code would look like: a wrong row, after its probe
        table = original_build(*args, **kwargs)
        table.columns[0][7] += 1
        return table

    monkeypatch.setattr(engine, "build_table", corrupted)
    result = verify_class(discovery.describe(modeling_llama.LlamaRotaryEmbedding))
    assert any("values differ" in problem for problem in result.problems), result


def test_classes_that_are_not_wrapped_are_reported_without_building(patched):
    from transformers.models.llama import modeling_llama

    import rope_patch

    rope_patch.unpatch()
    assert rope_patch.patch(exclude="llama")
    result = verify_class(discovery.describe(modeling_llama.LlamaRotaryEmbedding))
    assert result.status is Status.EXCLUDED and result.problems == ()
