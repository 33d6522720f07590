"""Table life cycle: growth and memory, invalidation, device/dtype keys,
meta-device init, save/load, threads, and inputs that must take the unpatched
path (same result or same exception)."""

import threading

import pytest
import torch

import rope_patch
from rope_patch import cache
from rope_patch.cache.table import MIN_TABLE
from tests.conftest import assert_identical, assert_same_outcome, held_bytes, table_info, unpatched
from tests.models import llama_config, llama_rotary


def table_of(module, dtype=torch.float32, layer_type=None):
    return cache.state_of(module).tables[(torch.device("cpu"), dtype, layer_type)]


def test_tables_grow_geometrically_and_hold_at_most_twice_the_positions_used(patched):
    module = llama_rotary(max_position_embeddings=1 << 16)
    x = torch.randn(1, 1, 64)
    row_bytes = 2 * 16 * 4  # cos + sin, head_dim 16, fp32
    for used in (1, 100, 1000, 2048, 2049, 5000, 32768):
        positions = torch.tensor([[used - 1]])
        assert_identical(unpatched(module, x, positions), module(x, positions))
        size = table_info(module).positions
        assert used <= size <= max(2 * used, MIN_TABLE)
        assert held_bytes(module) == size * row_bytes
        assert held_bytes(module) <= max(2 * used, MIN_TABLE) * row_bytes


def test_positions_beyond_the_cap_take_the_unpatched_path():
    assert rope_patch.patch(max_positions=100)
    module = llama_rotary()
    x = torch.randn(1, 3, 64)
    inside, beyond = torch.tensor([[0, 50, 99]]), torch.tensor([[0, 50, 100]])
    assert_identical(unpatched(module, x, inside), module(x, inside))
    assert_identical(unpatched(module, x, beyond), module(x, beyond))
    assert table_info(module).positions == 100


@pytest.mark.parametrize(
    "positions",
    [
        torch.tensor([[-1, 0, 1]]),
        torch.tensor([[3, -7]]),
        torch.tensor([[0, 1, 2]], dtype=torch.int32),
        torch.tensor([[0.0, 1.5, 2.0]]),
        torch.tensor([0, 1, 2]),
        torch.tensor([[[0, 1, 2]]]),
        torch.zeros(2, 0, dtype=torch.long),
        torch.tensor([[0, 1 << 40]]),
    ],
    ids=["negative", "negative-late", "int32", "float", "1-d", "3-d", "empty", "huge"],
)
def test_unusual_positions_match_the_unpatched_result_or_exception(patched, positions):
    module = llama_rotary()
    x = torch.randn(1, 3, 64)
    module(x, torch.arange(3)[None])  # a table exists: the fast path is live
    assert_same_outcome(module, x, positions)


def test_to_half_and_back_rebuilds_from_the_new_frequencies(patched):
    module = llama_rotary()
    x, positions = torch.randn(1, 5, 64), torch.tensor([[0, 1, 100, 1000, 2000]])
    module(x, positions)
    for convert in (
        lambda m: m.to(torch.float16),
        lambda m: m.float(),
        lambda m: m.half(),
        lambda m: m.to(torch.float32),
    ):
        convert(module)
        for dtype in (torch.float32, torch.float16):
            assert_identical(unpatched(module, x.to(dtype), positions), module(x.to(dtype), positions))


def test_in_place_change_of_inv_freq_or_scaling_invalidates(patched):
    module = llama_rotary()
    x, positions = torch.randn(1, 4, 64), torch.arange(4)[None] * 300
    module(x, positions)
    module.inv_freq.mul_(0.5)
    assert_identical(unpatched(module, x, positions), module(x, positions))
    module.attention_scaling = 1.25
    assert_identical(unpatched(module, x, positions), module(x, positions))
    module.inv_freq = module.inv_freq * 3  # replaced by assignment
    assert_identical(unpatched(module, x, positions), module(x, positions))


def test_stale_tables_of_other_keys_are_dropped(patched):
    module = llama_rotary()
    x, positions = torch.randn(1, 4, 64), torch.arange(4)[None]
    module(x, positions)
    module(x.bfloat16(), positions)
    module.half()
    module(x.half(), positions)
    info = rope_patch.cache_info(module)
    assert [(t.device, t.dtype, t.layer_type) for t in info.tables] == [(torch.device("cpu"), torch.float16, None)]


def test_meta_device_init_then_materialisation(patched):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config()
    with torch.device("meta"):
        module = LlamaRotaryEmbedding(config)
    x_meta, meta_positions = torch.empty(1, 3, 64, device="meta"), torch.arange(3, device="meta")[None]
    try:  # 4.57 raises on meta (autocast has no meta device); 5.x returns meta tensors
        expected = unpatched(module, x_meta, meta_positions)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            module(x_meta, meta_positions)
    else:
        out = module(x_meta, meta_positions)
        assert out[0].device.type == "meta" and out[0].shape == expected[0].shape
    module = module.to_empty(device="cpu")
    # Materialise the way from_pretrained's init does: in place, on the new storage.
    inv_freq, _ = LlamaRotaryEmbedding(config).inv_freq, None
    module.inv_freq.copy_(inv_freq)
    module.original_inv_freq.copy_(inv_freq)
    x, positions = torch.randn(1, 3, 64), torch.tensor([[0, 9, 1500]])
    assert_identical(unpatched(module, x, positions), module(x, positions))
    module.inv_freq.fill_(0.25)  # a later re-init is seen too
    assert_identical(unpatched(module, x, positions), module(x, positions))


def test_save_pretrained_from_pretrained_round_trip(patched, tmp_path):
    import transformers

    config = llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
        with torch.no_grad():
            patched_logits = loaded(ids).logits
            with rope_patch.disabled():
                reference = loaded(ids).logits
        assert_identical(reference, patched_logits)
        if dtype == torch.float32:
            assert_identical(logits, patched_logits)


def test_threads_building_at_once_share_one_table_and_agree(patched):
    module = llama_rotary()
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    positions = torch.arange(64)[None].expand(2, -1) + torch.tensor([[0], [500]])
    expected = unpatched(module, x, positions)
    barrier = threading.Barrier(8)
    results, errors, seen_tables = [], [], set()

    def worker():
        try:
            barrier.wait()
            for _ in range(20):
                results.append(module(x, positions))
                seen_tables.add(id(table_of(module, torch.bfloat16)))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 160
    for result in results:
        assert_identical(expected, result)
    assert len(seen_tables) == 1


def test_tf32_matmul_precision_gets_exact_tables(patched):
    module = llama_rotary()
    x, positions = torch.randn(1, 3, 64), torch.tensor([[1, 3000, 4095]])
    exact = unpatched(module, x, positions)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert_identical(exact, module(x, positions))
        assert torch.get_float32_matmul_precision() == "high"  # restored after the build
    finally:
        torch.set_float32_matmul_precision(previous)


def test_a_forward_that_is_not_position_elementwise_falls_back_with_one_warning(patched, caplog):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class NormalisedRotaryEmbedding(LlamaRotaryEmbedding):
        """Scales positions by the largest one in the call: not elementwise."""

        def forward(self, x, position_ids):
            scaled = position_ids.float() / (position_ids.max().float() + 1) * 100
            freqs = scaled[..., None] * self.inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rope_patch.patch_class(NormalisedRotaryEmbedding)
    module = NormalisedRotaryEmbedding(llama_config())
    x = torch.randn(1, 4, 64)
    with caplog.at_level("WARNING", logger="rope_patch"):
        for positions in (torch.arange(4)[None], torch.tensor([[7, 3, 9, 1]]), torch.arange(4)[None] + 50):
            assert_identical(unpatched(module, x, positions), module(x, positions))
    warnings = [r for r in caplog.records if "NormalisedRotaryEmbedding" in r.getMessage()]
    assert len(warnings) == 1
    assert rope_patch.cache_info(module).fallback


def test_a_forward_that_only_gathers_from_its_own_buffer_is_left_to_itself(patched, monkeypatch):
    # GPT-J and CodeGen: ``embed_positions[position_ids]`` split in two. It is
    # already a table lookup; answering it from another one would only add
    # the wrapper's work (it measured 0.57-0.69x of unpatched at decode).
    class GatheringRotaryEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            angles = torch.arange(512.0)[:, None] * torch.rand(8)
            sincos = torch.cat((angles.sin(), angles.cos()), dim=1)
            self.register_buffer("embed_positions", sincos, persistent=False)  # torch.nn.Buffer is 2.5+

        def forward(self, x, position_ids):
            sincos = self.embed_positions[position_ids].to(x.dtype)
            return torch.split(sincos, sincos.shape[-1] // 2, dim=-1)

    rope_patch.patch_class(GatheringRotaryEmbedding)
    module = GatheringRotaryEmbedding()
    x = torch.randn(1, 3, 64)
    for positions in (torch.tensor([[0, 1, 2]]), torch.tensor([[7, 300, 9]])):
        assert_identical(unpatched(module, x, positions), module(x, positions))
    info = rope_patch.cache_info(module)
    assert not info.tables and "only gathers rows of its precomputed embed_positions" in info.fallback
    slow = []
    monkeypatch.setattr("rope_patch.forward.slow_call", lambda *args: slow.append(args))
    assert_identical(unpatched(module, x, positions), module(x, positions))
    assert not slow  # straight to the original: no table lookup, no slow path


def test_a_position_layout_the_forward_refuses_goes_straight_to_it(patched, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class PlanarOnlyRotaryEmbedding(LlamaRotaryEmbedding):
        def forward(self, x, position_ids):
            if position_ids.dim() != 2:
                raise ValueError("position_ids must be (batch, seq)")
            return super().forward(x, position_ids)

    rope_patch.patch_class(PlanarOnlyRotaryEmbedding)
    module = PlanarOnlyRotaryEmbedding(llama_config())
    x, planar = torch.randn(1, 3, 64), torch.tensor([[4, 5, 6]])
    for _ in range(2):
        assert_identical(unpatched(module, x, planar), module(x, planar))
    axes = planar[None].expand(3, 1, 3)
    with pytest.raises(ValueError, match="must be"):
        module(x, axes)  # learns that this layout is not for tables
    slow = []
    monkeypatch.setattr("rope_patch.forward.slow_call", lambda *args: slow.append(args))
    with pytest.raises(ValueError, match="must be"):
        module(x, axes)
    assert not slow
    assert_identical(unpatched(module, x, planar), module(x, planar))
    assert rope_patch.cache_info(module).answered


def test_a_forward_whose_work_no_torch_function_sees_is_still_cached(patched):
    # Work outside torch's Python dispatch (here under DisableTorchFunction,
    # as in C++ extensions) leaves no op names: not taken for a gather.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class OpaqueRotaryEmbedding(LlamaRotaryEmbedding):
        def forward(self, x, position_ids):
            with torch._C.DisableTorchFunction():
                freqs = position_ids[..., None].float() * self.inv_freq.float()
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rope_patch.patch_class(OpaqueRotaryEmbedding)
    module = OpaqueRotaryEmbedding(llama_config())
    x = torch.randn(1, 3, 64)
    for positions in (torch.tensor([[0, 1, 2]]), torch.tensor([[7, 300, 9]])):
        assert_identical(unpatched(module, x, positions), module(x, positions))
    assert rope_patch.cache_info(module).answered
