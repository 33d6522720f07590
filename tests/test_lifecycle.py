"""Model life cycle: dtype round trips, whole-model save/load and deepcopy,
two models of one class with different configs, and thousands of forwards
with growing positions: no stale table, no leak."""

import copy
import gc
import io

import torch
import transformers

import rope_patch
from rope_patch import cache
from rope_patch.cache.table import MIN_TABLE
from tests.conftest import assert_identical
from tests.models import TINY, llama_config


def llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(**overrides)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def reference_logits(model, ids):
    with rope_patch.disabled():
        return logits(model, ids)


def test_dtype_round_trips_and_half(patched):
    model = llama()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    for convert in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to(torch.float32),
        lambda m: m.half(),
        lambda m: m.float(),
    ):
        convert(model)
        assert_identical(reference_logits(model, ids), logits(model, ids))


def test_whole_model_save_load_and_deepcopy(patched):
    model = llama()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    expected = logits(model, ids)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert_identical(expected, logits(clone, ids))
        assert set(clone.state_dict()) == set(model.state_dict())


def test_two_models_of_one_class_with_different_configs(patched):
    short = llama(max_position_embeddings=256, rope_theta=10_000.0)
    long = llama(seed=1, max_position_embeddings=4096, rope_theta=500_000.0)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    for _ in range(2):
        for model in (short, long):
            assert_identical(reference_logits(model, ids), logits(model, ids))
    short_table = cache.state_of(short.model.rotary_emb).tables
    long_table = cache.state_of(long.model.rotary_emb).tables
    assert short_table is not long_table


def test_thousands_of_growing_forwards_keep_memory_bounded_and_free_it(patched):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(llama_config(max_position_embeddings=8192))
    x = torch.randn(1, 1, 64)
    row_bytes = 2 * 16 * 4
    for position in range(0, 6000, 2):
        positions = torch.tensor([[position]])
        out = rotary(x, positions)
        if position % 1000 == 0:
            with rope_patch.disabled():
                assert_identical(rotary(x, positions), out)
        assert rope_patch.cache_info(rotary).bytes <= max(2 * (position + 1), MIN_TABLE) * row_bytes
    key = id(rotary)
    del rotary, out
    gc.collect()
    assert key not in cache.states


def test_from_pretrained_with_dtype(patched, tmp_path):
    model = llama()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
        assert_identical(reference_logits(loaded, ids), logits(loaded, ids))
