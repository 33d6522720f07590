"""Every static rope type is cached and bit-identical on Llama; dynamic (NTK)
and longrope are answered from tables where their state update would change
nothing, and leave the module in exactly the unpatched state."""

import contextlib

import pytest
import torch
import transformers

import rope_patch
from tests import models
from tests.conftest import TorchCalls, answered, assert_identical, module_state, unpatched
from tests.models import llama_rotary, transformers_major

STATIC = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5},
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available_static_types():
    """The static types this transformers knows ("proportional" is 5.x only)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return [name for name in STATIC if name == "default" or name in ROPE_INIT_FUNCTIONS]


def test_every_static_type_of_this_transformers_is_exercised():
    expected = {"default", "linear", "llama3", "yarn"} | ({"proportional"} if transformers_major() >= 5 else set())
    assert set(available_static_types()) == expected


def position_patterns():
    generator = torch.Generator().manual_seed(0)
    return {
        "decode": torch.tensor([[37]]),
        "decode batch": torch.tensor([[5], [900], [0]]),
        "prefill": torch.arange(300)[None],
        "prefill batch": torch.arange(120)[None].expand(2, -1) + torch.tensor([[0], [7]]),
        "random": torch.randint(0, 2048, (3, 50), generator=generator),
        "repeated": torch.tensor([[4, 4, 4, 0, 0, 2047]]),
    }


def check_all_patterns(module, expect_cached):
    for dtype in DTYPES:
        for positions in position_patterns().values():
            x = torch.randn(positions.shape[0], positions.shape[1], 64, dtype=dtype)
            reference = unpatched(module, x, positions)
            for _ in range(2):  # first use (verified) and table hit
                assert_identical(reference, module(x, positions))
    assert answered(module) == expect_cached


@pytest.mark.parametrize("rope_type", available_static_types())
def test_static_rope_types_are_cached_and_identical(patched, rope_type):
    module = llama_rotary(STATIC[rope_type])
    check_all_patterns(module, expect_cached=True)


DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + i for i in range(8)],
    "original_max_position_embeddings": 256,
}


def longrope_rotary(**overrides):
    """A Phi-3-style longrope rotary: original maximum 256, maximum 1024."""
    kwargs = dict(max_position_embeddings=1024, **overrides)
    if transformers_major() < 5:
        kwargs["original_max_position_embeddings"] = 256  # 4.57 reads it from the config
    return llama_rotary(LONGROPE, **kwargs)


def follow(module, twin, calls):
    """Call ``module`` (patched) and ``twin`` (unpatched, same config) with the
    same sequence of positions: identical outputs and identical module state
    after every call. Returns whether each call computed cos (False: it was
    answered from a table)."""
    return ["cos" in counts for counts in follow_calls(module, twin, calls)]


def follow_calls(module, twin, calls):
    """:func:`follow`, returning for each patched call the torch functions it
    ran (name -> count)."""
    names = []
    for positions in calls:
        x = torch.randn(positions.shape[0], positions.shape[1], 64)
        expected = unpatched(twin, x, positions)
        with TorchCalls() as spy:
            actual = module(x, positions)
        assert_identical(expected, actual)
        assert module_state(module) == module_state(twin), f"state differs after positions up to {int(positions.max())}"
        names.append(spy.counts)
    return names


def test_dynamic_ntk_in_range_calls_are_answered_and_state_follows(patched):
    module, twin = (llama_rotary(DYNAMIC, max_position_embeddings=256) for _ in range(2))
    lengths = (16, 17, 40, 600, 601, 16, 17, 1000, 3, 4, 256, 255)
    computed = follow(module, twin, [torch.arange(n)[None] for n in lengths])
    # In range and unscaled: from the table (after the first build and check).
    assert computed[1:3] == [False, False] and computed[6] is False and computed[9] is False
    # Scaled (past the original maximum, or back at exactly it while scaled): computed.
    assert computed[3] and computed[4] and computed[7]
    assert answered(module)


def test_scaled_dynamic_ntk_calls_run_the_unpatched_forward_once(patched):
    # While scaled, every decode step is a new state: no table can answer,
    # and the call must cost what the unpatched one does (one update, one
    # computation), not an extra update on top.
    module, twin = (llama_rotary(DYNAMIC, max_position_embeddings=256) for _ in range(2))
    follow(module, twin, [torch.arange(16)[None], torch.arange(17)[None], torch.arange(600)[None]])
    for counts in follow_calls(module, twin, [torch.tensor([[600 + n]]) for n in range(3)]):
        assert counts["max"] == 1 and counts["cos"] == 1, dict(counts)
    assert follow(module, twin, [torch.arange(16)[None], torch.arange(17)[None]]) == [True, False]


def test_longrope_switches_frequency_sets_like_the_original(patched):
    module, twin = longrope_rotary(), longrope_rotary()
    lengths = (10, 11, 700, 701, 10, 11, 300, 256, 257, 5)
    computed = follow(module, twin, [torch.arange(n)[None] for n in lengths])
    # Both sets are answered from tables once seen; switching back reuses the first.
    assert computed[1] is False and computed[3] is False and computed[4] is False and computed[5] is False
    assert len(rope_patch.cache_info(module).tables) == 2


def test_longrope_long_set_calls_are_answered_without_the_update(patched):
    # Once the long set is the module's and its table verified, a call that
    # reaches the original maximum needs no update (it would select the set
    # the module holds): neither its torch.max nor a cos runs.
    module, twin = longrope_rotary(), longrope_rotary()
    follow(module, twin, [torch.arange(300)[None], torch.tensor([[300]]), torch.tensor([[301]])])
    decode = [torch.tensor([[302 + n]]) for n in range(3)]
    mixed = [torch.tensor([[5], [400]]), torch.tensor([[256, 10]])]  # the largest position decides
    for positions, counts in zip(decode + mixed, follow_calls(module, twin, decode + mixed)):
        assert not {"max", "cos"} & set(counts), (positions.tolist(), sorted(counts))
    # A call below the original maximum is the update's: back to the short set.
    (counts,) = follow_calls(module, twin, [torch.tensor([[255]])])
    assert "max" in counts


def test_longrope_batch_with_one_long_row_uses_the_long_set(patched):
    module, twin = longrope_rotary(), longrope_rotary()
    calls = [torch.arange(20)[None], torch.tensor([[5, 6, 7], [600, 601, 602]]), torch.tensor([[5, 6, 7], [8, 9, 10]])]
    follow(module, twin, calls * 2)


def tiny_causal_lm(config_class, rope_scaling, original):
    """A 2-layer random-weight model whose RoPE switches at ``original``."""
    kwargs = dict(models.TINY, max_position_embeddings=4 * original, pad_token_id=0)
    if transformers_major() >= 5:
        kwargs["rope_parameters"] = dict(rope_scaling, rope_theta=10000.0)
    elif rope_scaling["rope_type"] == "longrope":  # 4.57 Phi3Config takes exactly these three keys
        kwargs["rope_scaling"] = {"type": "longrope", **{k: rope_scaling[k] for k in ("short_factor", "long_factor")}}
        kwargs["original_max_position_embeddings"] = original
    else:
        kwargs["rope_scaling"] = dict(rope_scaling)
    if rope_scaling["rope_type"] == "longrope" and transformers_major() >= 5:
        kwargs["rope_parameters"]["original_max_position_embeddings"] = original
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "config_class, rope_scaling",
    [("LlamaConfig", DYNAMIC), ("Phi3Config", {**LONGROPE, "short_factor": [1.0] * 8, "long_factor": [3.0] * 8})],
    ids=["dynamic", "longrope"],
)
def test_generate_across_the_switch_point(config_class, rope_scaling, patched):
    """Prompt below the original maximum, generation past it: identical
    tokens, scores and rotary state, with the in-range calls from tables."""
    original = 32
    rope_scaling = {k: v for k, v in rope_scaling.items() if k != "original_max_position_embeddings"}
    ids = torch.randint(0, models.TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    outputs, states = [], []
    for patching in (False, True):
        model = tiny_causal_lm(config_class, rope_scaling, original)
        with torch.no_grad(), contextlib.nullcontext() if patching else rope_patch.disabled():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=30,
                min_new_tokens=30,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        outputs.append((out.sequences, torch.stack(out.scores)))
        states.append(module_state(model.model.rotary_emb))
        if patching:
            assert answered(model.model.rotary_emb)
    assert_identical(outputs[0][0], outputs[1][0])
    assert_identical(outputs[0][1], outputs[1][1])
    assert states[0] == states[1]
