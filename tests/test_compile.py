"""torch.compile: the patched forward is a plain function that defers to the
original while dynamo traces, so fullgraph compilation works in either order
(patch then compile, compile then patch) and gives the eager numbers."""

import pytest
import torch
import transformers

import rope_patch
from tests.conftest import assert_identical
from tests.models import TINY


def qwen3(seed=0):
    config = transformers.Qwen3Config(**dict(TINY, head_dim=16))
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("order", ["patch-then-compile", "compile-then-patch"])
def test_fullgraph_compile_matches_eager(order):
    torch._dynamo.reset()
    model = qwen3()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    eager = logits(model, ids)
    if order == "patch-then-compile":
        assert rope_patch.patch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if order == "compile-then-patch":
        assert rope_patch.patch()
    assert_identical(eager, logits(compiled, ids))
    # The eager model, patched, still matches too (tables answer there).
    assert_identical(eager, logits(model, ids))


def test_dynamo_sees_no_graph_break_in_the_patched_forward(patched):
    torch._dynamo.reset()
    model = qwen3()
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_inductor_compile_matches_eager(patched):
    torch._dynamo.reset()
    model = qwen3()
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    with rope_patch.disabled():
        eager = logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(eager, logits(compiled, ids), atol=1e-5, rtol=1e-5)  # inductor fuses: not bitwise
    # Same compiled graph with and without the patch: bitwise equal.
    rope_patch.unpatch()
    torch._dynamo.reset()
    unpatched_compiled = torch.compile(qwen3(), fullgraph=True)
    assert_identical(logits(unpatched_compiled, ids), logits(compiled, ids))


def test_generate_with_static_cache_and_compiled_forward(patched):
    torch._dynamo.reset()
    model = qwen3()
    ids = torch.randint(1, TINY["vocab_size"], (1, 5))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    with rope_patch.disabled():
        reference = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert_identical(reference, model.generate(ids, **kwargs))
