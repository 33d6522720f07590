"""Small random-weight models and rotary modules built from configs (no hub)."""

from __future__ import annotations

import torch
import transformers

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=2048,
)


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


def image_prompt_positions(text_before, grid, text_after, start=0):
    """(3, S) multimodal RoPE positions laid out like Qwen2-VL's
    get_rope_index: text on all axes (temporal, height, width), one frame of
    an ``h x w`` image grid (temporal fixed, height and width walk the grid),
    then text continuing after the largest position."""
    height, width = grid
    text = torch.arange(start, start + text_before).expand(3, -1)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    image = torch.stack([torch.zeros_like(rows), rows, cols]) + start + text_before
    after_start = int(image.max()) + 1
    after = torch.arange(after_start, after_start + text_after).expand(3, -1)
    return torch.cat([text, image, after], dim=1)
