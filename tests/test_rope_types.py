"""Every static rope type is cached and bit-identical on Llama; dynamic and
longrope keep their per-call semantics (computed unpatched)."""

import pytest
import torch

import rope_patch
from tests.conftest import answered, assert_identical, unpatched
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
        for name, positions in position_patterns().items():
            x = torch.randn(positions.shape[0], positions.shape[1], 64, dtype=dtype)
            reference = unpatched(module, x, positions)
            for _ in range(2):  # first use (verified) and table hit
                assert_identical(reference, module(x, positions))
    assert answered(module) == expect_cached


@pytest.mark.parametrize("rope_type", available_static_types())
def test_static_rope_types_are_cached_and_identical(patched, rope_type):
    module = llama_rotary(STATIC[rope_type])
    check_all_patterns(module, expect_cached=True)


def test_dynamic_ntk_is_computed_per_call(patched):
    module = llama_rotary({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=256)
    x = torch.randn(1, 1, 64)
    # Grow past max_position_embeddings, then come back: inv_freq changes each way.
    for length in (16, 600, 16, 1000, 3):
        positions = torch.arange(length)[None]
        reference_module = llama_rotary({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=256)
        reference_module.load_state_dict(module.state_dict())
        reference_module.inv_freq = module.inv_freq.clone()
        reference_module.max_seq_len_cached = module.max_seq_len_cached
        reference = unpatched(reference_module, x, positions)
        assert_identical(reference, module(x, positions))
        assert torch.equal(reference_module.inv_freq, module.inv_freq)  # same side effect
    info = rope_patch.cache_info(module)
    assert not info.tables and info.unpatched


def test_longrope_switches_frequency_sets_like_the_original(patched):
    config = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0 + i for i in range(8)],
        "original_max_position_embeddings": 256,
        "factor": 4.0,
    }
    module = llama_rotary(config, max_position_embeddings=1024)
    twin = llama_rotary(config, max_position_embeddings=1024)
    x = torch.randn(1, 1, 64)
    for length in (10, 700, 10, 300):
        positions = torch.arange(length)[None]
        assert_identical(unpatched(twin, x, positions), module(x, positions))
        assert torch.equal(twin.inv_freq, module.inv_freq)
