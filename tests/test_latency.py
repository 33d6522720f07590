"""rope_patch.diagnostics.latency: timing any built rotary module (fast: one
block per variant, one short shape)."""

import pytest
import torch

import rope_patch
from rope_patch.cli.bench import MODELS, build_rotary, model_config, rotary_class
from rope_patch.diagnostics import latency
from tests.models import transformers_major


@pytest.fixture
def patched():
    with latency.ensure_patched():
        yield


@pytest.mark.parametrize("call", ["function", "module"])
def test_measure_times_unpatched_patched_floor(patched, call):
    module = build_rotary("qwen3")
    rows = latency.measure(
        module, torch.float32, ((1, 1), (2, 3)), repeats=1, budget_s=0.01, call=call, with_disabled=True
    )
    assert [row.shape for row in rows] == [(1, 1), (2, 3)]
    for row in rows:
        assert row.unpatched_us > 0 and row.patched_us > 0 and row.floor_us > 0 and row.disabled_us > 0
        assert row.speedup == pytest.approx(row.unpatched_us / row.patched_us)
        assert row.label == "Qwen3RotaryEmbedding" and row.dtype is torch.float32 and row.call == call
    assert rope_patch.cache_info(module).answered
    assert type(module) is rotary_class("qwen3")  # the module-call swap is undone


def test_measure_patches_only_for_the_measurement():
    assert not rope_patch.is_patched()
    rows = latency.measure(build_rotary("llama3"), torch.bfloat16, ((1, 1),), repeats=1, label="llama3")
    assert rows[0].label == "llama3" and rows[0].floor_us is not None
    assert not rope_patch.is_patched()


def test_measure_refuses_an_excluded_class():
    rope_patch.patch(exclude=["qwen3"])
    try:
        with pytest.raises(RuntimeError, match="not patched"):
            latency.measure(build_rotary("qwen3"), torch.float32, ((1, 1),), repeats=1)
    finally:
        rope_patch.unpatch()


def test_unpatched_class_runs_the_original(patched):
    cls = rotary_class("qwen3")
    unpatched = latency.unpatched_class(cls)
    assert issubclass(unpatched, cls) and unpatched.forward is cls.forward.__wrapped__
    assert latency.unpatched_class(cls) is unpatched


def test_benchmark_models_are_data():
    assert set(MODELS) == {"qwen3", "llama3"}
    config = model_config("llama3", num_hidden_layers=1)
    assert config.num_hidden_layers == 1 and config.head_dim == 128
    assert latency.position_ids_for((2, 1), "cpu").tolist() == [
        [latency.DECODE_POSITION],
        [latency.DECODE_POSITION + 13],
    ]


def test_multi_axis_shapes_time_text_tokens_on_every_axis(patched):
    positions = latency.position_ids_for((3, 2, 1), "cpu")
    assert positions.shape == (3, 2, 1) and positions.is_contiguous()
    assert (positions == latency.position_ids_for((2, 1), "cpu")).all()
    assert latency.shape_name((3, 2, 1)) == "3x2x1"
    module = build_rotary("qwen3")
    if transformers_major() < 5:  # its batched matmul mixes 3-D positions up: not a layout for tables
        with pytest.raises(RuntimeError, match="not answered from tables"):
            latency.measure(module, torch.float32, ((1, 1), (3, 1, 1)), repeats=1, budget_s=0.01)
        return
    rows = latency.measure(module, torch.float32, ((3, 1, 1),), repeats=1, budget_s=0.01)
    assert rows[0].shape == (3, 1, 1) and rows[0].patched_us > 0
