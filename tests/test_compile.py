"""torch.compile: the patched forward is a plain function that defers to the
original while dynamo traces, so fullgraph compilation works in either order
(patch then compile, compile then patch) and gives the eager numbers.

Each test first compiles the model unpatched (conftest.unpatched_or_skip):
where the installed torch cannot compile the installed transformers'
model even so (torch 2.4 with transformers 4.57: dynamo does not support
``PretrainedConfig.get_text_config``), the test is skipped with that reason."""

import pytest
import torch
import transformers

import rope_patch
from tests.conftest import assert_identical, unpatched_or_skip
from tests.models import TINY

FULLGRAPH = "torch.compile(fullgraph=True, backend='aot_eager') of a Qwen3"
INDUCTOR = "torch.compile(fullgraph=True) with inductor of a Qwen3"


def qwen3(seed=0):
    config = transformers.Qwen3Config(**dict(TINY, head_dim=16))
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def compiled_unpatched_or_skip(ids, feature=FULLGRAPH, **options):
    """The logits of a fresh Qwen3 compiled with ``options``, unpatched; skip
    where that fails. Leaves dynamo reset."""
    torch._dynamo.reset()
    options = {"backend": "aot_eager", **options} if feature == FULLGRAPH else options
    result = unpatched_or_skip(feature, lambda: logits(torch.compile(qwen3(), fullgraph=True, **options), ids))
    torch._dynamo.reset()
    return result


@pytest.mark.parametrize("order", ["patch-then-compile", "compile-then-patch"])
def test_fullgraph_compile_matches_eager(order):
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    compiled_unpatched_or_skip(ids)
    model = qwen3()
    eager = logits(model, ids)
    if order == "patch-then-compile":
        assert rope_patch.patch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if order == "compile-then-patch":
        assert rope_patch.patch()
    assert_identical(eager, logits(compiled, ids))
    # The eager model, patched, still matches too (tables answer there).
    assert_identical(eager, logits(model, ids))


def test_dynamo_sees_no_graph_break_in_the_patched_forward():
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    compiled_unpatched_or_skip(ids)
    assert rope_patch.patch()
    model = qwen3()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_inductor_compile_matches_eager():
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    # The same compiled graph without the patch (first: it is also the check
    # that inductor compiles this model here).
    unpatched_compiled = compiled_unpatched_or_skip(ids, INDUCTOR)
    assert rope_patch.patch()
    model = qwen3()
    with rope_patch.disabled():
        eager = logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)
    patched_compiled = logits(compiled, ids)
    assert torch.allclose(eager, patched_compiled, atol=1e-5, rtol=1e-5)  # inductor fuses: not bitwise
    # Same compiled graph with and without the patch: bitwise equal.
    assert_identical(unpatched_compiled, patched_compiled)


def test_generate_with_static_cache_and_compiled_forward():
    ids = torch.randint(1, TINY["vocab_size"], (1, 5))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}

    def generate_compiled_unpatched():
        torch._dynamo.reset()
        model = qwen3()
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        return model.generate(ids, **kwargs)

    unpatched_or_skip("generate with a static cache and a compiled forward", generate_compiled_unpatched)
    torch._dynamo.reset()
    assert rope_patch.patch()
    model = qwen3()
    with rope_patch.disabled():
        reference = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert_identical(reference, model.generate(ids, **kwargs))
