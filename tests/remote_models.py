"""Remote-code model folders (``trust_remote_code=True``), written by the
tests, in the styles public repositories use:

- ``internvl``: an InternVL2-style chat module (``auto_map`` points at it)
  that imports its language model from a sibling module,
  ``modeling_internlm2.py``, whose rotaries are InternLM2's: the Llama-2-era
  ``_set_cos_sin_cache(seq_len, device, dtype)`` convention, a cache built in
  ``__init__`` for ``max_position_embeddings`` positions and rebuilt by
  ``forward(x, seq_len)`` only when ``seq_len`` passes it (linear and dynamic
  NTK subclasses as InternLM2 ships them);
- ``phi3``: Phi-3 v0.0.5-style attention passing ``seq_len=kv_seq_len`` to
  ``forward(x, position_ids, seq_len=None)`` rotaries: Phi-3's own (which
  never read it; the su-scaled one rewrites ``inv_freq`` on every call) and
  a transformers 4.38-era copy that reads it (to warn it is deprecated);
- ``deepseek``: DeepSeek-V3-style rotaries whose ``__init__`` leaves
  ``max_seq_len_cached = None``, so ``forward(x, seq_len)`` rebuilds
  ``cos_cached``/``sin_cached`` at every new length (YaRN's rebuild also
  re-registers ``inv_freq``), one rotary per attention layer;
- ``internlm25``: InternLM2.5-style rotaries, ``forward(x, position_ids)``,
  one per attention layer, the dynamic NTK one re-registering ``inv_freq``
  once a call passes ``max_position_embeddings``.

Every model is tiny (random weights), generates greedily with or without
``use_cache``-free decoding, and keeps the attention code of its family:
the rotary's calling convention is what matters here.
"""

from __future__ import annotations

import json
import pathlib

CONFIGURATION = """
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vocab_size=64, hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                 max_position_embeddings=16, rope_theta=10000.0, rotary="default", rotary_factor=2.0,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        # which rotary class each layer uses (a name, or a list of names per layer)
        self.rotary = rotary
        self.rotary_factor = rotary_factor
        super().__init__(**kwargs)
"""

#: The decoder around the rotary: embedding, attention layers, head. Each
#: family defines ``Attention.rotary_cos_sin(value_states, position_ids,
#: kv_seq_len)`` the way its attention calls its rotary.
DECODER = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_class(config, layer_idx):
    names = config.rotary if isinstance(config.rotary, list) else [config.rotary] * config.num_hidden_layers
    return ROTARIES[names[layer_idx]]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary_emb = make_rotary(rotary_class(config, layer_idx), self.head_dim, config)

    def forward(self, hidden, position_ids, layer_past=None):
        batch, seq, _ = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kv_seq_len = seq if layer_past is None else seq + layer_past[0].shape[-2]
        cos, sin = self.rotary_cos_sin(v, position_ids, kv_seq_len)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if layer_past is not None:
            k, v = torch.cat([layer_past[0], k], dim=2), torch.cat([layer_past[1], v], dim=2)
        attention = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        return self.out(attention.transpose(1, 2).reshape(batch, seq, -1)), (k, v)


class ToyForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Attention(config, i) for i in range(config.num_hidden_layers)])
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, layer_pasts=None, **kwargs):
        past = 0 if layer_pasts is None else layer_pasts[0][0].shape[-2]
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
        hidden = self.embed(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            update, present = layer(hidden, position_ids, None if layer_pasts is None else layer_pasts[i])
            hidden = hidden + update
            presents.append(present)
        output = CausalLMOutput(logits=self.head(hidden))
        output.layer_pasts = presents  # a plain KV cache for hand-written decode loops (benchmarks)
        return output
"""

HEADER = """
import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_toy import ToyConfig
"""

# --------------------------------------------------------------------------
# InternLM2 (the InternVL2 language model): the _set_cos_sin_cache convention

INTERNLM2 = (
    HEADER
    + """

class InternLM2RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()

        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

        # Build here to make `torch.jit.trace` work.
        self._set_cos_sin_cache(
            seq_len=max_position_embeddings, device=self.inv_freq.device, dtype=torch.get_default_dtype()
        )

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)

        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        # Different from paper, but it uses a different permutation in order to obtain the same calculation
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        # x: [bs, num_attention_heads, seq_len, head_size]
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=torch.float32)

        return (
            self.cos_cached[:seq_len].to(dtype=x.dtype),
            self.sin_cached[:seq_len].to(dtype=x.dtype),
        )


class InternLM2LinearScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base, device)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)
        t = t / self.scaling_factor

        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)


class InternLM2DynamicNTKScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base, device)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len

        if seq_len > self.max_position_embeddings:
            base = self.base * (
                (self.scaling_factor * seq_len / self.max_position_embeddings) - (self.scaling_factor - 1)
            ) ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)

        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)


ROTARIES = {
    "default": InternLM2RotaryEmbedding,
    "linear": InternLM2LinearScalingRotaryEmbedding,
    "dynamic": InternLM2DynamicNTKScalingRotaryEmbedding,
}


def make_rotary(cls, head_dim, config):
    if cls is InternLM2RotaryEmbedding:
        return cls(head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta)
    return cls(head_dim, config.max_position_embeddings, config.rope_theta, scaling_factor=config.rotary_factor)
"""
    + DECODER
    + """

def rotary_cos_sin(self, value_states, position_ids, kv_seq_len):
    cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
    return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


Attention.rotary_cos_sin = rotary_cos_sin


class InternLM2ForCausalLM(ToyForCausalLM):
    pass
"""
)

INTERNVL_CHAT = '''
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .configuration_toy import ToyConfig
from .modeling_internlm2 import InternLM2ForCausalLM


class InternVLChatModel(PreTrainedModel, GenerationMixin):
    """The chat model holds the language model of a sibling module (InternVL2's layout)."""

    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.language_model = InternLM2ForCausalLM(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.language_model(input_ids, attention_mask=attention_mask, **kwargs)
'''

# --------------------------------------------------------------------------
# Phi-3 v0.0.5: the attention passes seq_len=kv_seq_len

PHI3 = (
    HEADER
    + '''

class Phi3RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()

        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.register_buffer("inv_freq", None, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids, seq_len=None):
        # x: [bs, num_attention_heads, seq_len, head_size]
        if self.inv_freq is None:
            self.inv_freq = 1.0 / (
                self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=x.device).float() / self.dim)
            )
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        # Force float32 since bfloat16 loses precision on long contexts
        # See https://github.com/huggingface/transformers/pull/29285
        device_type = x.device.type
        device_type = device_type if isinstance(device_type, str) and device_type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos()
            sin = emb.sin()
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class Phi3SuScaledRotaryEmbedding(Phi3RotaryEmbedding):
    def __init__(self, dim, config, device=None):
        super().__init__(dim, config.max_position_embeddings, config.rope_theta, device)

        self.short_factor = [1.0 + 0.05 * i for i in range(dim // 2)]
        self.long_factor = [2.0 + 0.5 * i for i in range(dim // 2)]
        self.original_max_position_embeddings = config.max_position_embeddings // 2

    @torch.no_grad()
    def forward(self, x, position_ids, seq_len=None):
        seq_len = torch.max(position_ids) + 1
        if seq_len > self.original_max_position_embeddings:
            ext_factors = torch.tensor(self.long_factor, dtype=torch.float32, device=x.device)
        else:
            ext_factors = torch.tensor(self.short_factor, dtype=torch.float32, device=x.device)

        inv_freq_shape = torch.arange(0, self.dim, 2, dtype=torch.int64, device=x.device).float() / self.dim
        self.inv_freq = 1.0 / (ext_factors * self.base**inv_freq_shape)

        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()

        device_type = x.device.type
        device_type = device_type if isinstance(device_type, str) and device_type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)

            scale = self.max_position_embeddings / self.original_max_position_embeddings
            if scale <= 1.0:
                scaling_factor = 1.0
            else:
                scaling_factor = math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))

            cos = emb.cos() * scaling_factor
            sin = emb.sin() * scaling_factor
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class LegacyRotaryEmbedding(nn.Module):
    """transformers 4.38's Llama rotary, as remote code of that time copied it:
    it reads seq_len, to warn that it is deprecated."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids, seq_len=None):
        if seq_len is not None:
            pass  # logger.warning_once("The `seq_len` argument is deprecated and unused.") in the original
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


ROTARIES = {"default": Phi3RotaryEmbedding, "su": Phi3SuScaledRotaryEmbedding, "legacy": LegacyRotaryEmbedding}


def make_rotary(cls, head_dim, config):
    if cls is Phi3SuScaledRotaryEmbedding:
        return cls(head_dim, config)
    return cls(head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta)
'''
    + DECODER
    + """

def rotary_cos_sin(self, value_states, position_ids, kv_seq_len):
    cos, sin = self.rotary_emb(value_states, position_ids, seq_len=kv_seq_len)
    return cos.unsqueeze(1), sin.unsqueeze(1)


Attention.rotary_cos_sin = rotary_cos_sin
"""
)

# --------------------------------------------------------------------------
# DeepSeek-V3: max_seq_len_cached is None after __init__

DEEPSEEK = (
    HEADER
    + """

class DeepseekV3RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()

        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

        # Build here to make `torch.jit.trace` work.
        self._set_cos_sin_cache(
            seq_len=max_position_embeddings,
            device=self.inv_freq.device,
            dtype=torch.get_default_dtype(),
        )
        self.max_seq_len_cached = None

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)

        freqs = torch.outer(t, self.inv_freq.to(t.device))
        # Different from paper, but it uses a different permutation in order to obtain the same calculation
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        # x: [bs, num_attention_heads, seq_len, head_size]
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)

        return (
            self.cos_cached[:seq_len].to(dtype=x.dtype),
            self.sin_cached[:seq_len].to(dtype=x.dtype),
        )


# Inverse dim formula to find dim based on number of rotations
def yarn_find_correction_dim(num_rotations, dim, base=10000, max_position_embeddings=2048):
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


# Find dim range bounds based on rotations
def yarn_find_correction_range(low_rot, high_rot, dim, base=10000, max_position_embeddings=2048):
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)  # Clamp values just in case


def yarn_get_mscale(scale=1, mscale=1):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_linear_ramp_mask(min, max, dim):
    if min == max:
        max += 0.001  # Prevent singularity

    linear_func = (torch.arange(dim, dtype=torch.float32) - min) / (max - min)
    ramp_func = torch.clamp(linear_func, 0, 1)
    return ramp_func


class DeepseekV3YarnRotaryEmbedding(DeepseekV3RotaryEmbedding):
    def __init__(
        self,
        dim,
        max_position_embeddings=2048,
        base=10000,
        device=None,
        scaling_factor=1.0,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=1,
        mscale_all_dim=0,
    ):
        self.scaling_factor = scaling_factor
        self.original_max_position_embeddings = original_max_position_embeddings
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim
        super().__init__(dim, max_position_embeddings, base, device)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        dim = self.dim

        freq_extra = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        freq_inter = 1.0 / (
            self.scaling_factor * self.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        )

        low, high = yarn_find_correction_range(
            self.beta_fast,
            self.beta_slow,
            dim,
            self.base,
            self.original_max_position_embeddings,
        )
        inv_freq_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2).to(device=device, dtype=torch.float32)
        inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask
        self.register_buffer("inv_freq", inv_freq, persistent=False)

        t = torch.arange(seq_len, device=device, dtype=torch.float32)

        freqs = torch.outer(t, inv_freq)

        _mscale = float(
            yarn_get_mscale(self.scaling_factor, self.mscale)
            / yarn_get_mscale(self.scaling_factor, self.mscale_all_dim)
        )

        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", (emb.cos() * _mscale).to(dtype), persistent=False)
        self.register_buffer("sin_cached", (emb.sin() * _mscale).to(dtype), persistent=False)


ROTARIES = {"default": DeepseekV3RotaryEmbedding, "yarn": DeepseekV3YarnRotaryEmbedding}


def make_rotary(cls, head_dim, config):
    if cls is DeepseekV3RotaryEmbedding:
        return cls(head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta)
    return cls(
        head_dim,
        max_position_embeddings=config.max_position_embeddings,
        scaling_factor=config.rotary_factor,
        base=config.rope_theta,
        original_max_position_embeddings=config.max_position_embeddings // 4,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
"""
    + DECODER
    + """

def rotary_cos_sin(self, value_states, position_ids, kv_seq_len):
    cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
    return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


Attention.rotary_cos_sin = rotary_cos_sin
"""
)

# --------------------------------------------------------------------------
# InternLM2.5: forward(x, position_ids), one rotary per layer

INTERNLM25 = (
    HEADER
    + '''

class InternLM2RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        super().__init__()
        self.scaling_factor = scaling_factor
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # For BC we register cos and sin cached
        self.max_seq_len_cached = max_position_embeddings

    @torch.no_grad()
    def forward(self, x, position_ids):
        # x: [bs, num_attention_heads, seq_len, head_size]
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        # Force float32 since bfloat16 loses precision on long contexts
        # See https://github.com/huggingface/transformers/pull/29285
        device_type = x.device.type
        device_type = device_type if isinstance(device_type, str) and device_type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos()
            sin = emb.sin()
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class InternLM2DynamicNTKScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    """InternLM2RotaryEmbedding extended with Dynamic NTK scaling."""

    def forward(self, x, position_ids):
        # difference to the original RoPE: inv_freq is recomputed when the sequence length > original length
        seq_len = torch.max(position_ids) + 1
        if seq_len > self.max_position_embeddings:
            base = self.base * (
                (self.scaling_factor * seq_len / self.max_position_embeddings) - (self.scaling_factor - 1)
            ) ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (
                base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float().to(x.device) / self.dim)
            )
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # TODO joao: this may break with compilation

        cos, sin = super().forward(x, position_ids)
        return cos, sin


ROTARIES = {"default": InternLM2RotaryEmbedding, "dynamic": InternLM2DynamicNTKScalingRotaryEmbedding}


def make_rotary(cls, head_dim, config):
    return cls(head_dim, config.max_position_embeddings, config.rope_theta, scaling_factor=config.rotary_factor)
'''
    + DECODER
    + """

def rotary_cos_sin(self, value_states, position_ids, kv_seq_len):
    cos, sin = self.rotary_emb(value_states, position_ids)
    return cos.unsqueeze(1), sin.unsqueeze(1)


Attention.rotary_cos_sin = rotary_cos_sin
"""
)

#: style -> (the model type, {file name: source}, the auto_map model class)
STYLES = {
    "internvl": (
        "internvl_chat",
        {"modeling_internlm2.py": INTERNLM2, "modeling_internvl_chat.py": INTERNVL_CHAT},
        "modeling_internvl_chat.InternVLChatModel",
    ),
    "phi3": ("phi3", {"modeling_phi3.py": PHI3}, "modeling_phi3.ToyForCausalLM"),
    "deepseek": ("deepseek_v3", {"modeling_deepseek.py": DEEPSEEK}, "modeling_deepseek.ToyForCausalLM"),
    "internlm25": ("internlm2", {"modeling_internlm2.py": INTERNLM25}, "modeling_internlm2.ToyForCausalLM"),
}


def write_model_folder(folder: pathlib.Path, style: str, **config) -> pathlib.Path:
    """Write a config-only model folder of ``style`` (see the module
    docstring) with ``config`` values (``rotary``: the rotary class per
    layer; ``max_position_embeddings``, ``num_hidden_layers``, ...)."""
    model_type, files, model_class = STYLES[style]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_toy.py").write_text(CONFIGURATION.format(model_type=model_type))
    for name, source in files.items():
        (folder / name).write_text(source)
    auto_map = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModelForCausalLM": model_class}
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": auto_map, **config}))
    return folder
