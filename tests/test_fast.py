"""The compiled answers (rope_patch.cache.fast) answer exactly when the rule
(rope_patch.cache.rule.answering_form, then the form's gather) does, with
the same output: over calls of every kind a rule item refuses, and over
every change of frequency state the watch sees, for each kind of table
(a (cos, sin) pair, a layout-following form, M-RoPE, a layer type, an
accelerator's bound check, longrope's long set, inference tensors)."""

from __future__ import annotations

import pytest
import torch

from rope_patch import cache
from rope_patch.cache import fast, rule
from rope_patch.cache.families import longrope_threshold
from tests.conftest import assert_identical, unpatched
from tests.models import llama_rotary, transformers_major
from tests.test_rope_types import longrope_rotary


def interpreted(table, module, x, position_ids, layer_type):
    """What the general path answers for this call: the table of the call's
    key, the rule, then the gather (None where one refuses, as a CPU gather
    outside the table does)."""
    if cache.state_of(module).tables.get((x.device, x.dtype, layer_type)) is not table:
        return None
    form = rule.answering_form(table, x, position_ids)
    if form is None:
        return None
    try:
        return form.lookup(module, x, position_ids)
    except (IndexError, RuntimeError):
        return None


def assert_agree(table, form, dtype, module, x, position_ids, extra, label):
    """The compiled answer refuses where the rule does and otherwise returns
    what the rule's gather and the unpatched forward return."""
    answer = fast.compile_answer(table, form, dtype)
    expected = interpreted(table, module, x, position_ids, extra[0] if extra else None)
    actual = answer(module, x, position_ids)
    assert (expected is None) == (actual is None), (
        f"{label}: the rule {'answers' if expected is not None else 'refuses'}, the compiled answer does not\n"
        + answer.__source__
    )
    if expected is not None:
        assert_identical(expected, actual)
        assert_identical(unpatched(module, x, position_ids, *extra), actual)


def calls(x, size, dims):
    """Calls that one rule item or the gather refuses, and ones they answer."""
    base = torch.tensor([[3, 1, 4]])
    if dims == 3:
        base = base[None].expand(3, -1, -1).contiguous()
    yield "plain", x, base
    yield "int32 positions", x, base.int()
    yield "int16 positions", x, base.short()
    yield "float positions", x, base.float()
    yield "empty positions", x, base[..., :0]
    yield "positions beyond the table", x, base + size
    yield "negative positions", x, base - 5
    yield "meta positions", x, base.to("meta")
    yield "another activation dtype", x.double(), base
    yield "a meta activation", x.to("meta"), base
    yield "another number of dimensions", x, base[0] if dims == 3 else base[None].expand(3, -1, -1)
    yield "transposed positions", x, base.t() if dims == 2 else base.transpose(1, 2)
    if dims == 3:
        yield "another number of axes", x, base[:2]


def state_changes(module):
    """Changes of what the forward reads, each one seen by Watch.check."""
    name = next(iter(module._buffers))
    buffer = module._buffers[name]
    yield "nothing", lambda: None
    if not buffer.is_inference():
        yield "an in-place edit", lambda: buffer.add_(0)  # same values, a new version
    yield "a new buffer with equal values", lambda: module.register_buffer(name, buffer.clone(), persistent=False)
    yield ".data replaced", lambda: setattr(module._buffers[name], "data", buffer.clone())
    if "attention_scaling" in vars(module):
        yield "an equal attention_scaling", lambda: setattr(module, "attention_scaling", module.attention_scaling + 0.0)
        yield "attention_scaling removed", lambda: delattr(module, "attention_scaling")
    yield "the buffer removed", lambda: module._buffers.pop(name)


def start_positions(dims):
    return torch.tensor([[1, 2]]) if dims == 2 else torch.arange(2).repeat(3, 1, 1)


def built(make, x, dims, extra, prepare):
    """A new module from ``make`` with its table built and verified: (module,
    table, form, activation dtype)."""
    module = make()
    for _ in range(3):  # build, verify on first use, answer
        module(x, start_positions(dims), *extra)
    layer_type = extra[0] if extra else None
    key, table = next((k, t) for k, t in cache.state_of(module).tables.items() if k[2] == layer_type)
    if prepare is not None:
        prepare(table)
    return module, table, table.forms[dims], key[1]


def check(make, x, dims=2, extra=(), prepare=None):
    """Every call kind, and every change of frequency state (each on a new
    module): the rule and the compiled answer agree."""
    module, table, form, dtype = built(make, x, dims, extra, prepare)
    label = type(module).__name__
    for what, call_x, position_ids in calls(x, table.size, dims):
        assert_agree(table, form, dtype, module, call_x, position_ids, extra, f"{label}, {what}")
    buffer = next(iter(module._buffers.values()))
    if not buffer.is_inference():  # an inference tensor cannot require grad
        with torch.enable_grad():
            buffer.requires_grad_(True)
            assert_agree(table, form, dtype, module, x, start_positions(dims), extra, f"{label}, requires grad")
            with torch.no_grad():
                assert_agree(table, form, dtype, module, x, start_positions(dims), extra, f"{label}, no_grad")
    for index in range(len(list(state_changes(make())))):
        module, table, form, dtype = built(make, x, dims, extra, prepare)
        what, change = list(state_changes(module))[index]
        change()
        assert_agree(table, form, dtype, module, x, start_positions(dims), extra, f"{label}, after {what}")


def test_a_cos_sin_pair(patched):
    check(llama_rotary, torch.zeros(1, 3, 8))


def test_inference_tensors(patched):
    def make():
        with torch.inference_mode():
            return llama_rotary()

    check(make, torch.zeros(1, 3, 8))


def test_an_accelerator_bound_check(patched):
    def as_on_an_accelerator(table):  # the gather's own range check out of play
        table.on_cpu, table.bound_check = False, True

    check(llama_rotary, torch.zeros(1, 3, 8), prepare=as_on_an_accelerator)


def test_a_layout_following_form(patched):
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = transformers.GptOssConfig(head_dim=16, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    check(lambda: GptOssRotaryEmbedding(config), torch.zeros(1, 3, 8))


@pytest.mark.skipif(transformers_major() < 5, reason="transformers 4.57 has one module per layer type, no key")
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_a_layer_type_key(patched, layer_type):
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = transformers.Gemma3TextConfig(head_dim=16, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    check(lambda: Gemma3RotaryEmbedding(config), torch.zeros(1, 3, 8), extra=(layer_type,))


def test_mrope(patched):
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from rope_patch.diagnostics.instances import build_instance
    from rope_patch.discovery import describe

    rotary = describe(modeling_qwen2_vl.Qwen2VLRotaryEmbedding)
    check(lambda: build_instance(rotary, "cpu").module, torch.zeros(1, 3, 8), dims=3)


def test_longrope_long_set(patched):
    module = longrope_rotary()
    x = torch.zeros(1, 1, 8)
    threshold = longrope_threshold(module, None)
    long = torch.tensor([[threshold + 5]])
    for _ in range(3):
        module(x, long)
    key, table = next(iter(cache.state_of(module).tables.items()))
    assert table.top_from == threshold
    for what, position_ids in {
        "at or past the original maximum": long,
        "below it": torch.tensor([[threshold - 3]]),
        "a batch reaching it": torch.tensor([[3], [threshold]]),
    }.items():
        assert_agree(table, table.forms[2], key[1], module, x, position_ids, (), f"longrope, {what}")


def test_the_source_is_kept_on_the_function(patched):
    module = llama_rotary()
    for _ in range(3):
        module(torch.zeros(1, 1, 8), torch.tensor([[1]]))
    answer = cache.state_of(module).answer
    assert answer is not None and answer.__source__.startswith("def answer(module, x, position_ids):")
