"""End to end: greedy generation with small random-weight models gives the
same tokens and the same logits, bit for bit, with and without the patch."""

import pytest
import torch
import transformers

import rope_patch
from tests import models
from tests.conftest import assert_identical

MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
}

TINY = dict(models.TINY, vocab_size=256, max_position_embeddings=512)


def build(config_name, model_name, overrides, dtype):
    config = getattr(transformers, config_name)(**dict(TINY, **overrides))
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to(dtype).eval()


def greedy(model, ids, mask):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_is_identical(name, dtype):
    model = build(*MODELS[name], dtype)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: batch rows at different positions
    reference_tokens, reference_logits = greedy(model, ids, mask)

    assert rope_patch.patch()
    tokens, logits = greedy(model, ids, mask)
    assert_identical(reference_tokens, tokens)
    assert_identical(reference_logits, logits)
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    assert rotaries
    for rotary in rotaries:  # the tables really served the calls
        assert rope_patch.cache_info(rotary).answered
