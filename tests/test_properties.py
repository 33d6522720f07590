"""Hostile inputs, property-based: whatever position_ids and x a caller
passes, the patched forward returns what the unpatched forward returns, or
raises the same exception type."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rope_patch
from tests.conftest import assert_identical
from tests.models import llama_rotary

VALUE_RANGES = {
    "small": (0, 40),
    "wide": (0, 70_000),
    "negative": (-50, 50),
    "huge": (2**31, 2**40),
}
INDEX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.float16, torch.bool]


@st.composite
def position_ids(draw):
    ndim = draw(st.sampled_from([0, 1, 2, 2, 2, 3]))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    low, high = VALUE_RANGES[draw(st.sampled_from(sorted(VALUE_RANGES)))]
    count = 1
    for size in shape:
        count *= size
    values = draw(st.lists(st.integers(low, high), min_size=count, max_size=count))
    if count and draw(st.booleans()):  # duplicates
        values = [values[0]] * count
    tensor = torch.tensor(values, dtype=torch.int64).reshape(shape)
    dtype = draw(st.sampled_from(INDEX_DTYPES))
    if dtype not in (torch.int64,):
        tensor = tensor.clamp(-(2**15), 2**15) if dtype != torch.bool else tensor
        tensor = tensor.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded", "strided"]))
    if layout == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    elif layout == "expanded" and tensor.dim() >= 1 and tensor.shape[0] == 1:
        tensor = tensor.expand(3, *tensor.shape[1:])
    elif layout == "strided" and tensor.dim() >= 1:
        tensor = tensor.repeat_interleave(2, dim=-1)[..., ::2]
    return tensor


@st.composite
def activations(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=4)))
    return torch.randn(shape).to(dtype)


def outcome(call):
    try:
        return "ok", call()
    except Exception as error:  # noqa: BLE001
        return "raised", type(error)


MODULE = None


def module():
    global MODULE
    if MODULE is None:
        MODULE = llama_rotary()
    return MODULE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=position_ids(), x=activations())
def test_patched_matches_unpatched_on_any_input(patched, positions, x):
    rotary = module()
    with rope_patch.disabled():
        expected = outcome(lambda: rotary(x, positions))
    for _ in range(2):
        actual = outcome(lambda: rotary(x, positions))
        assert actual[0] == expected[0], (actual, expected)
        if expected[0] == "ok":
            assert_identical(expected[1], actual[1])
        else:
            assert actual[1] is expected[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_of_positions_share_the_table(patched, dtype):
    rotary = llama_rotary()
    base = torch.arange(24).reshape(4, 6)
    x = torch.randn(4, 6, 8).to(dtype)
    for view in (base, base[:, ::2], base.t(), base[:1].expand(4, -1), base[1:3], base.flip(0)):
        with rope_patch.disabled():
            expected = rotary(x[: view.shape[0], : view.shape[1]], view)
        assert_identical(expected, rotary(x[: view.shape[0], : view.shape[1]], view))
