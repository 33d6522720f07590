"""Small random-weight models and rotary modules built from configs (no hub)."""

from __future__ import annotations

import torch
import transformers

from rope_patch.diagnostics.verify import image_prompt_positions  # noqa: F401 - re-exported for the tests

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 2048,
}


def llama_config(rope_scaling=None, **overrides):
    """A tiny LlamaConfig; ``rope_scaling`` as both transformers lines accept it."""
    kwargs = dict(TINY, **overrides)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    return transformers.LlamaConfig(**kwargs)


def llama_rotary(rope_scaling=None, **overrides):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(llama_config(rope_scaling, **overrides))


def causal_lm(config_class, seed=0, **overrides):
    """A tiny random-weight causal LM of ``config_class`` (by name), eval mode."""
    config = getattr(transformers, config_class)(**dict(TINY, **overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def transformers_major():
    return int(transformers.__version__.split(".")[0])
