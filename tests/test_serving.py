"""Continuous batching: ``model.generate_batch`` (paged attention, the path
``transformers serve --continuous-batching`` takes) gives the same tokens,
log-probabilities and logits with and without the patch, and the rotary
calls, whose position_ids pack several requests into one row, are answered
from the tables.

The batching loop runs in a thread of its own, so ``rope_patch.disabled()``
around ``generate_batch`` in the caller's thread would not reach it: the
reference run is made unpatched (before ``patch()``), not inside
``disabled()``.

On transformers 4.57 ``generate_batch`` exists but cannot start on CPU: its
cache sizing subtracts from the CPU's total memory, which 4.57 reports as
None (``get_device_and_memory_breakdown``; TypeError in the batching
thread). The ``cpu_memory`` fixture has it report a total instead, the
cache being sized explicitly here anyway (num_blocks, max_batch_tokens).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

import rope_patch
from tests import models
from tests.conftest import cpu_threads, unpatched_or_skip

V5 = models.transformers_major() >= 5
NEW_TOKENS = 12
PROMPT_LENGTHS = (5, 17, 9, 30)
TINY = dict(models.TINY, max_position_embeddings=512)

#: model type -> (config class, overrides); Gemma3 has sliding and full
#: attention layers, hence two rotary layer types on 5.x (two modules on 4.57).
MODELS = {
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma3_text": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
}
#: The paged attention implementations that continuous batching accepts on
#: CPU: eager and SDPA (5.x switches "sdpa" to its paged form itself).
ATTENTION = ["paged|eager", "sdpa"] if V5 else ["eager_paged", "sdpa_paged"]
#: The feature, for conftest.unpatched_or_skip: each test's reference run is
#: made first, unpatched, through it.
BATCHING = "continuous batching (generate_batch) on CPU"


def has_continuous_batching() -> bool:
    return hasattr(transformers.GenerationMixin, "generate_batch")


pytestmark = pytest.mark.skipif(
    not has_continuous_batching(),
    reason=f"transformers {transformers.__version__} has no continuous batching (GenerationMixin.generate_batch)",
)


@pytest.fixture(autouse=True)
def cpu_memory(monkeypatch):
    """transformers 4.57 reports no total memory for the CPU, so its paged
    cache cannot be sized there (see the module docstring): report 8 GiB."""
    cpu_threads()
    if V5:
        return
    from transformers.generation.continuous_batching import cache

    _, total, _, _ = cache.get_device_and_memory_breakdown()
    if total is None:
        monkeypatch.setattr(cache, "get_device_and_memory_breakdown", lambda: (torch.device("cpu"), 8 << 30, 0, 0))


def build(model_type, attention, dtype=torch.float32):
    config_name, overrides = MODELS[model_type]
    config = getattr(transformers, config_name)(**dict(TINY, **overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.to(dtype).eval()


def prompts():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def rotaries(model):
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    assert found
    return found


class Recorder:
    """What the model saw and produced during one ``generate_batch``: the
    position_ids of every rotary call (the schedule) and every logits tensor
    of the LM head, through ordinary forward hooks."""

    def __init__(self, model):
        self.positions, self.logits = [], []
        rotary = rotaries(model)[0]
        rotary.register_forward_pre_hook(self._rotary, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(self._head)

    def _rotary(self, module, args, kwargs):
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        self.positions.append(position_ids.tolist())

    def _head(self, module, args, output):
        self.logits.append(output.detach().clone())

    def clear(self):
        self.positions, self.logits = [], []


def generate_batch(model, inputs):
    """Greedy continuous batching of ``inputs``; {request id: (tokens, log-probabilities)}."""
    if V5:
        from transformers import ContinuousBatchingConfig

        config = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
        batching = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256, return_logprobs=True)
        outputs = model.generate_batch(
            inputs, generation_config=config, continuous_batching_config=batching, max_new_tokens=NEW_TOKENS
        )
    else:
        config = transformers.GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=0, num_blocks=16, max_batch_tokens=256
        )
        outputs = model.generate_batch(inputs, generation_config=config, progress_bar=False, max_new_tokens=NEW_TOKENS)
    assert len(outputs) == len(inputs), outputs
    for output in outputs.values():
        assert output.error is None, output.error
        assert len(output.generated_tokens) == NEW_TOKENS, output
    return {key: (list(output.generated_tokens), list(output.logprobs)) for key, output in outputs.items()}


def recorded_run(model, recorder, inputs, schedule=None, tries=3):
    """One ``generate_batch``; with ``schedule``, repeated (up to ``tries``
    times) until the loop batched the requests the same way: which requests
    share a batch depends on thread timing, and a different packing may
    change low bits of the logits, patched or not."""
    for _ in range(tries):
        recorder.clear()
        results = generate_batch(model, inputs)
        if schedule is None or recorder.positions == schedule:
            break
    return results, recorder.positions, recorder.logits


def assert_packed(schedule, inputs):
    """Some call packed several requests into one row of position_ids
    (positions that go down along the row), and the longest request was
    fed up to its last position (5.x stops before feeding the last new
    token back, 4.57 feeds it once more)."""
    rows = [row for call in schedule for row in call]
    assert any(any(b < a for a, b in itertools.pairwise(row)) for row in rows), schedule[:3]
    last = max(len(prompt) for prompt in inputs) + NEW_TOKENS - 2
    assert last <= max(max(row) for row in rows) <= last + 1, schedule


def assert_same_run(reference, patched):
    tokens, schedule, logits = reference
    assert patched[0] == tokens  # tokens and log-probabilities (5.x), per request
    assert patched[1] == schedule, "the batching loop packed the requests differently three times"
    assert len(patched[2]) == len(logits)
    for expected, actual in zip(logits, patched[2]):
        assert expected.dtype == actual.dtype and torch.equal(expected, actual)


EAGER, SDPA = ATTENTION
#: Each model with both attention implementations, each in fp32 and bf16
#: (six cases rather than twelve: a ``generate_batch`` costs about 0.8 s
#: here, most of it the gc.collect() its manager runs when it stops).
CASES = [
    ("llama", EAGER, torch.float32),
    ("llama", SDPA, torch.float32),
    ("qwen3", EAGER, torch.bfloat16),
    ("qwen3", SDPA, torch.float32),
    ("gemma3_text", EAGER, torch.float32),
    ("gemma3_text", SDPA, torch.bfloat16),
]


@pytest.mark.parametrize(
    ("model_type", "attention", "dtype"), CASES, ids=lambda value: str(value).replace("torch.", "").replace("|", "-")
)
def test_generate_batch_is_identical_and_answered_from_tables(model_type, attention, dtype):
    model = build(model_type, attention, dtype)
    recorder = Recorder(model)
    inputs = prompts()

    reference = unpatched_or_skip(BATCHING, lambda: recorded_run(model, recorder, inputs))
    assert_packed(reference[1], inputs)
    # Unpatched, nothing is answered from tables: the check below can fail.
    assert not any(rope_patch.cache_info(rotary).answered for rotary in rotaries(model))
    if V5:
        assert all(len(logprobs) == NEW_TOKENS for _, logprobs in reference[0].values())

    assert rope_patch.patch()
    patched = recorded_run(model, recorder, inputs, schedule=reference[1])
    assert_same_run(reference, patched)

    longest = max(PROMPT_LENGTHS) + NEW_TOKENS
    for rotary in rotaries(model):
        info = rope_patch.cache_info(rotary)
        assert info.answered, info
        assert info.fallback is None
        verified = [table for table in info.tables if table.verified]
        assert verified and all(table.dtype == dtype and table.positions >= longest for table in verified), info
    if V5 and model_type == "gemma3_text":  # one rotary, one table per attention type
        layer_types = {table.layer_type for table in rope_patch.cache_info(rotaries(model)[0]).tables}
        assert layer_types == {"sliding_attention", "full_attention"}


def test_generate_batch_with_the_model_excluded_is_not_answered():
    """``patch(exclude=...)``: same tokens, and ``answered`` stays False,
    so the test above would fail if the plugin did not serve the calls."""
    model = build("llama", EAGER)
    inputs = prompts()
    reference = unpatched_or_skip(BATCHING, lambda: generate_batch(model, inputs))
    assert rope_patch.patch(exclude=["llama"])
    assert generate_batch(model, inputs) == reference
    info = rope_patch.cache_info(rotaries(model)[0])
    assert not info.answered and not info.tables, info
