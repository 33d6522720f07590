"""Remote code (``trust_remote_code=True``): rotary classes in the modules
transformers loads as ``transformers_modules.*`` get the same treatment,
offline. Every model runs in a child process: HF_MODULES_CACHE must be set
before transformers is imported.

First a minimal folder written here: a config with ``auto_map`` and a
modeling file with two rotaries, a Llama-like one (``forward(x,
position_ids)``: cached) and one of the ``cos_cached`` era whose rebuild
takes only ``seq_len`` (slices its own cache: listed as fallback, with the
reason). Then folders in the styles public repositories use
(tests/remote_models.py: InternVL2's sibling module, Phi-3's seq_len-passing
attention, DeepSeek-V3's per-call cache rebuild, InternLM2.5's per-layer
dynamic NTK rotaries): generation, state, status(), cache_info and
``rope-patch check`` asserted exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rope_patch.cache.build import OWN_BUFFER
from rope_patch.cache.rebuild import METHOD, OWN_CACHE
from rope_patch.cache.state import SEQ_LEN_READ
from tests.conftest import subprocess_env
from tests.remote_models import write_model_folder

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


def write_toy_folder(tmp_path):
    folder = tmp_path / "toy_model"
    folder.mkdir()
    (folder / "configuration_toy.py").write_text(CONFIGURATION)
    (folder / "modeling_toy.py").write_text(MODELING)
    auto_map = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": "ropetoy", "auto_map": auto_map}))
    return folder


def test_remote_code_rotaries_are_patched_offline(tmp_path):
    folder = write_toy_folder(tmp_path)
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
    # The reason is the same as for the gathered copies of another dtype (rope-patch check's bfloat16)
    assert status == "fallback" and reason == OWN_BUFFER.format("cos_cached, sin_cached"), reason
    assert report["answered"] and report["fallback"] == reason


# --------------------------------------------------------------------------
# Remote code in the styles public repositories use (tests/remote_models.py)

STYLE_CHILD = """
import json, sys
import torch
order, folder, dtype_name, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if order == "auto first":
    import rope_patch.auto  # the documented order: before anything loads the remote code
import rope_patch
import transformers
from rope_patch.diagnostics.verify import module_state

dtype = getattr(torch, dtype_name)
config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)


def build():
    # from_config, not from_pretrained: transformers 5 leaves remote code's
    # non-persistent buffers (inv_freq, cos_cached) uninitialised when loading
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval().to(dtype)


model = build()
if order == "auto after":
    import rope_patch.auto
reference = build()


class Ops(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def generate(m, prompt, tokens):
    with torch.no_grad():
        out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, do_sample=False,
                         use_cache=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


def same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1].float().view(torch.int32), b[1].float().view(torch.int32))


prompts = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 3)]
identical = []
for prompt, tokens in zip(prompts, (new_tokens, new_tokens + 8)):
    with Ops() as ops:
        patched = generate(model, prompt, tokens)
    with rope_patch.disabled():
        unpatched = generate(reference, prompt, tokens)
    identical.append(same(patched, unpatched))
rotaries = {name: m for name, m in model.named_modules() if name.endswith("rotary_emb")}
twins = {name: m for name, m in reference.named_modules() if name.endswith("rotary_emb")}
infos = {name: rope_patch.cache_info(m) for name, m in rotaries.items()}
print(json.dumps({
    "identical": identical,
    "states": [module_state(rotaries[name]) == module_state(twins[name]) for name in rotaries],
    "status": {row.rotary.name: [str(row.status), row.reason, row.rotary.model_type] for row in rope_patch.status()},
    "tables": {name.split(".")[-2]: [[t.positions, t.bytes, list(t.forms), t.shared_by] for t in info.tables]
               for name, info in infos.items()},
    "fallback": {name.split(".")[-2]: info.fallback for name, info in infos.items()},
    "unpatched": {name.split(".")[-2]: list(info.unpatched) for name, info in infos.items()},
    "bytes": sum(info.bytes for info in infos.values()),
    "cos": ops.names.count("cos"),
}))
"""


def run_style(tmp_path, style, order="auto first", dtype="float32", new_tokens=20, **config):
    """Write a ``style`` folder (tests/remote_models.py), load it with
    ``trust_remote_code`` in a child process, generate twice patched and
    unpatched (fresh twins from one seed), and return the child's report."""
    folder = write_model_folder(tmp_path / "model", style, **config)
    child = subprocess.run(  # the return code is checked below
        [sys.executable, "-c", textwrap.dedent(STYLE_CHILD), order, str(folder), dtype, str(new_tokens)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert all(report["identical"]), report  # greedy tokens and logits, bit for bit, both generations
    assert all(report["states"]), report  # every rotary's own state (cos_cached, ...) as unpatched leaves it
    return report


@pytest.mark.parametrize("order", ["auto first", "auto after"])
def test_a_sibling_modules_rotaries_are_patched_in_either_import_order(tmp_path, order):
    """InternVL2: auto_map names the chat module, which imports the language
    model from a sibling module; its InternLM2 rotaries are patched whether
    rope_patch.auto comes before or after the model is loaded. Generation
    passes max_position_embeddings (16), so the forwards rebuild their
    caches: those rebuilds are answered from tables (shared by the two
    layers of equal state), except dynamic NTK's, which follow seq_len."""
    report = run_style(
        tmp_path, "internvl", order, rotary=["default", "default", "linear", "dynamic"], num_hidden_layers=4
    )
    elementwise = (
        f"calls reaching position 16 or beyond are computed unpatched: its cache rebuild ({METHOD}) is not "
        "position-elementwise: inv_freq for seq_len=1 is not what it is for seq_len=17 (values differ)"
    )
    assert report["status"] == {
        "InternLM2RotaryEmbedding": ["cached", "", "internlm2"],
        "InternLM2LinearScalingRotaryEmbedding": ["cached", "", "internlm2"],
        "InternLM2DynamicNTKScalingRotaryEmbedding": [
            "fallback",
            "; ".join(sorted([OWN_CACHE, elementwise])),
            "internlm2",
        ],
    }
    row = 64 * 32 * 4  # positions x head_dim x fp32
    assert report["tables"] == {
        "0": [[64, row, ["rebuild"], 2]],  # cos and sin columns, shared by layers 0 and 1: half each
        "1": [[64, row, ["rebuild"], 2]],
        "2": [[64, 2 * row, ["rebuild"], 1]],
        "3": [],
    }
    assert report["unpatched"] == {
        "0": [OWN_CACHE],
        "1": [OWN_CACHE],
        "2": [OWN_CACHE],
        "3": sorted([OWN_CACHE, elementwise]),
    }
    assert report["fallback"] == dict.fromkeys("0123")


def test_phi3_attention_passing_seq_len(tmp_path):
    """Phi-3 (remote code v0.0.5) passes seq_len=kv_seq_len on every call.
    Phi3RotaryEmbedding never reads it (proven from its bytecode): answered
    from one table for both layers. The su-scaled one ignores it too, but
    rewrites inv_freq on every call: a fallback that says so. A forward that
    reads it (transformers 4.38's deprecation warning) is a fallback with
    that reason, not "cached" with no table."""
    report = run_style(tmp_path, "phi3", rotary=["default", "default", "su", "legacy"], num_hidden_layers=4)
    every_call = "the forward changes the module's own state on every call (inv_freq)"
    assert report["status"] == {
        "Phi3RotaryEmbedding": ["cached", "", "phi3"],
        "Phi3SuScaledRotaryEmbedding": ["fallback", every_call, "phi3"],
        "LegacyRotaryEmbedding": ["fallback", SEQ_LEN_READ, "phi3"],
    }
    row = 64 * 32 * 4
    assert report["tables"] == {"0": [[64, row, ["2-D"], 2]], "1": [[64, row, ["2-D"], 2]], "2": [], "3": []}
    assert report["fallback"] == {"0": None, "1": None, "2": every_call, "3": None}
    assert report["unpatched"] == {"0": [], "1": [], "2": [], "3": [SEQ_LEN_READ]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_v3_rebuilds_its_cache_per_call_and_is_answered_from_tables(tmp_path, dtype):
    """DeepSeek-V3 leaves max_seq_len_cached None after __init__: its forward
    rebuilds cos_cached/sin_cached at every new length (every decode step).
    Each rebuild is answered from a table (YaRN's re-registered inv_freq
    included), the module's own state left as unpatched leaves it; layers of
    equal state share one table. The second generation needs no cos at all."""
    report = run_style(
        tmp_path, "deepseek", dtype=dtype, rotary=["default", "yarn", "yarn", "default"], num_hidden_layers=4
    )
    assert report["status"] == {
        "DeepseekV3RotaryEmbedding": ["cached", "", "deepseek"],
        "DeepseekV3YarnRotaryEmbedding": ["cached", "", "deepseek"],
    }
    row = 64 * 32 * (4 if dtype == "float32" else 2)
    yarn_inv_freq = 16 * 4  # the rebuild's constant inv_freq, held by each module's form
    assert report["tables"] == {
        "0": [[64, row, ["rebuild"], 2]],
        "1": [[64, row + yarn_inv_freq, ["rebuild"], 2]],
        "2": [[64, row + yarn_inv_freq, ["rebuild"], 2]],
        "3": [[64, row, ["rebuild"], 2]],
    }
    assert report["fallback"] == dict.fromkeys("0123")
    assert report["unpatched"] == {str(i): [OWN_CACHE] for i in range(4)}
    assert report["cos"] == 0


def test_per_layer_dynamic_ntk_rotaries_share_one_table_and_say_where_they_stop(tmp_path):
    """InternLM2.5: one dynamic NTK rotary per layer, forward(x,
    position_ids), re-registering inv_freq once a call passes
    max_position_embeddings (16). The three layers answer from one table of
    16 positions (the largest whose build leaves the state alone); calls
    past it are computed unpatched, with the reason; memory is one table."""
    report = run_style(tmp_path, "internlm25", rotary="dynamic", num_hidden_layers=3)
    capped = (
        "calls reaching position 16 or beyond are computed unpatched: the forward changes the module's own state "
        "when called with positions 0..16 (inv_freq)"
    )
    assert report["status"] == {
        "InternLM2RotaryEmbedding": ["cached", "", "internlm2"],  # its base class: no instance, nothing seen
        "InternLM2DynamicNTKScalingRotaryEmbedding": ["cached", "", "internlm2"],
    }
    table = 16 * 32 * 4 * 2  # positions x head_dim x fp32 x (cos, sin)
    assert report["tables"] == {str(i): [[16, table // 3, ["2-D"], 3]] for i in range(3)}
    assert report["unpatched"] == {str(i): [capped] for i in range(3)}
    assert report["bytes"] == table - table % 3


# --------------------------------------------------------------------------
# rope-patch check --trust-remote-code on such folders


def run_check(tmp_path, style, *options, **config):
    """``rope-patch check FOLDER --trust-remote-code --no-timing --json`` in
    a child process (HF_MODULES_CACHE must be set before transformers is
    imported) on a ``style`` folder (or the toy one); its report."""
    folder = write_toy_folder(tmp_path) if style == "toy" else write_model_folder(tmp_path / "model", style, **config)
    child = subprocess.run(  # the return code is checked below
        [
            sys.executable,
            "-m",
            "rope_patch",
            "check",
            str(folder),
            "--trust-remote-code",
            "--no-timing",
            "--json",
            *options,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def rows_of(report) -> dict:
    return {row["name"]: row for row in report["rotaries"]}


def test_check_reports_only_the_rotaries_the_remote_model_holds(tmp_path):
    """DeepSeek-V3's model_type is also a native one: the native class, which
    the loaded model never uses, is not counted (it was "1 of 5 answered",
    that one being the native class); the remote classes are checked as the
    model builds them, each rebuild answered from tables."""
    report = run_check(tmp_path, "deepseek", rotary=["default", "yarn", "yarn", "default"], num_hidden_layers=4)
    assert report["model_type"] == "deepseek_v3" and report["notes"] == []
    rows = rows_of(report)
    assert list(rows) == ["DeepseekV3RotaryEmbedding", "DeepseekV3YarnRotaryEmbedding"]
    assert all(row["module"].startswith("transformers_modules.") for row in rows.values())
    assert rows["DeepseekV3RotaryEmbedding"]["held"] == ["layers.0.rotary_emb", "layers.3.rotary_emb"]
    assert rows["DeepseekV3YarnRotaryEmbedding"]["held"] == ["layers.1.rotary_emb", "layers.2.rotary_emb"]
    for row in rows.values():
        assert (row["status"], row["reason"], row["identical"], row["unpatched"]) == ("cached", "", True, [OWN_CACHE])


def test_check_finds_sibling_rotaries_and_gives_the_runtime_reasons(tmp_path):
    """InternVL2: the rotaries live in the sibling module. Only the classes
    the config selects are reported, with the reasons the runtime gives
    (status() and cache_info: one vocabulary)."""
    report = run_check(tmp_path, "internvl", rotary=["default", "linear", "dynamic"], num_hidden_layers=3)
    rows = rows_of(report)
    assert list(rows) == [
        "InternLM2RotaryEmbedding",
        "InternLM2LinearScalingRotaryEmbedding",
        "InternLM2DynamicNTKScalingRotaryEmbedding",
    ]
    elementwise = (
        f"calls reaching position 16 or beyond are computed unpatched: its cache rebuild ({METHOD}) is not "
        "position-elementwise: inv_freq for seq_len=1 is not what it is for seq_len=17 (values differ)"
    )
    for name in ("InternLM2RotaryEmbedding", "InternLM2LinearScalingRotaryEmbedding"):
        assert (rows[name]["status"], rows[name]["reason"], rows[name]["unpatched"]) == ("cached", "", [OWN_CACHE])
    dynamic = rows["InternLM2DynamicNTKScalingRotaryEmbedding"]
    assert (dynamic["status"], dynamic["reason"]) == ("fallback", "; ".join(sorted([OWN_CACHE, elementwise])))
    assert all(row["identical"] for row in rows.values())


def test_check_on_phi3_says_which_calls_are_computed_unpatched(tmp_path):
    report = run_check(tmp_path, "phi3", "--dtype", "float32", rotary=["default", "su", "legacy"], num_hidden_layers=3)
    rows = rows_of(report)
    assert {name: (row["status"], row["reason"], row["unpatched"]) for name, row in rows.items()} == {
        "Phi3RotaryEmbedding": ("cached", "", []),
        "Phi3SuScaledRotaryEmbedding": (
            "fallback",
            "the forward changes the module's own state on every call (inv_freq)",
            [],
        ),
        "LegacyRotaryEmbedding": ("cached", "", [SEQ_LEN_READ]),
    }
    assert all(row["identical"] for row in rows.values())


def test_check_gives_the_runtimes_reason_in_another_dtype(tmp_path):
    """The toy's cos_cached-era rotary in bfloat16 (check's default) returns
    gathered copies, not views of its cache as in the runtime's float32:
    the same reason either way (it was "already answers from its own cache"
    at run time, "only gathers rows of its precomputed cos_cached" in check)."""
    rows = rows_of(run_check(tmp_path, "toy"))
    assert rows["ToyRotaryEmbedding"]["status"] == "cached"
    cached = rows["ToyCachedRotaryEmbedding"]
    assert (cached["status"], cached["reason"]) == ("fallback", OWN_BUFFER.format("cos_cached, sin_cached"))
