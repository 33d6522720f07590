"""Remote code (``trust_remote_code=True``): rotary classes in the modules
transformers loads as ``transformers_modules.*`` get the same treatment,
offline. A model folder is written here: a config with ``auto_map`` and a
modeling file with two rotaries, a Llama-like one (``forward(x,
position_ids)``: cached) and one of the ``cos_cached`` era (``forward(x,
seq_len)`` slicing its own cache: listed as fallback, with the reason).
Runs in a child process: HF_MODULES_CACHE must be set before transformers
is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import subprocess_env

CONFIGURATION = """
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "ropetoy"

    def __init__(self, vocab_size=64, hidden_size=32, num_attention_heads=2, max_position_embeddings=256, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
"""

MODELING = '''
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_toy import ToyConfig


class ToyRotaryEmbedding(nn.Module):
    """Llama-like: forward(x, position_ids)."""

    def __init__(self, dim, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class ToyCachedRotaryEmbedding(nn.Module):
    """The cos_cached era: forward(x, seq_len) slices its own cache."""

    def __init__(self, dim, max_position_embeddings, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self._set_cos_sin_cache(max_position_embeddings)

    def _set_cos_sin_cache(self, seq_len):
        self.max_seq_len_cached = seq_len
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ToyAttention(nn.Module):
    def __init__(self, config, old_style):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.old_style = old_style
        if old_style:
            self.rotary = ToyCachedRotaryEmbedding(self.head_dim, config.max_position_embeddings)
        else:
            self.rotary = ToyRotaryEmbedding(self.head_dim)

    def forward(self, hidden, position_ids):
        batch, seq, _ = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.old_style:
            cos, sin = self.rotary(v, seq_len=int(position_ids.max()) + 1)
            cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
        else:
            cos, sin = self.rotary(v, position_ids)
            cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attention = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attention.transpose(1, 2).reshape(batch, seq, -1))


class ToyForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ToyAttention(config, old_style=False), ToyAttention(config, old_style=True)])
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)
        position_ids = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
        for layer in self.layers:
            hidden = hidden + layer(hidden, position_ids)
        return CausalLMOutput(logits=self.head(hidden))
'''

CHILD = """
import json, os, sys
import torch
import rope_patch.auto  # before anything loads the remote code
import rope_patch
import transformers

folder = sys.argv[1]
config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
torch.manual_seed(0)  # random weights, written once
transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)

model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))

def generate():
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             use_cache=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)

patched = generate()
with rope_patch.disabled():
    reference = generate()
rows = {row.rotary.name: row for row in rope_patch.status()}
print(json.dumps({
    "module": type(model).__module__,
    "tokens": torch.equal(patched[0], reference[0]),
    "scores": torch.equal(patched[1].view(torch.int32), reference[1].view(torch.int32)),
    "status": {name: [str(rows[name].status), rows[name].reason, rows[name].rotary.model_type]
               for name in ("ToyRotaryEmbedding", "ToyCachedRotaryEmbedding") if name in rows},
    "answered": rope_patch.cache_info(model.layers[0].rotary).answered,
    "fallback": rope_patch.cache_info(model.layers[1].rotary).fallback,
}))
"""


def test_remote_code_rotaries_are_patched_offline(tmp_path):
    folder = tmp_path / "toy_model"
    folder.mkdir()
    (folder / "configuration_toy.py").write_text(CONFIGURATION)
    (folder / "modeling_toy.py").write_text(MODELING)
    auto_map = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": "ropetoy", "auto_map": auto_map}))
    child = subprocess.run(  # the return code is checked below
        [sys.executable, "-c", textwrap.dedent(CHILD), str(folder)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["tokens"] and report["scores"]
    assert report["status"]["ToyRotaryEmbedding"][:2] == ["cached", ""]
    assert report["status"]["ToyRotaryEmbedding"][2] == "toy"  # the model type: the modeling file's name
    status, reason, _ = report["status"]["ToyCachedRotaryEmbedding"]
    assert status == "fallback" and "own cache (cos_cached)" in reason, reason
    assert report["answered"] and "own cache" in report["fallback"]
