"""Multimodal RoPE (rope_patch.cache.forms.axes): 3-D position_ids (temporal, height,
width) answered from the 1-D tables, bit-identical to the unpatched forward
for text-only, image-grid and decode positions, batch > 1 with different
rope_deltas, fp32/bf16/fp16, int32/int64; growth, the cap and odd inputs;
and fallback (one warning) for a recomposition that mixes axes."""

import importlib
import logging

import pytest
import torch

import rope_patch
from rope_patch.cache.table import MIN_TABLE
from tests.conftest import CallsCos, answered_forms, assert_identical, assert_same_outcome, held_bytes, unpatched
from tests.models import image_prompt_positions, transformers_major

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: family -> (class prefix, rotary class, mrope_section): Qwen2-VL and
#: Qwen2.5-VL split chunked sections (16/24/24 in the real models), Qwen3-VL
#: interleaves them (24/20/20); here scaled to head_dim 32.
FAMILIES = {
    "qwen2_vl": ("Qwen2VL", "Qwen2VLRotaryEmbedding", [4, 6, 6]),
    "qwen2_5_vl": ("Qwen2_5_VL", "Qwen2_5_VLRotaryEmbedding", [4, 6, 6]),
    "qwen3_vl": ("Qwen3VL", "Qwen3VLTextRotaryEmbedding", [6, 5, 5]),
}


def mrope_rotary(family, head_dim=32, theta=1e6, max_position_embeddings=4096):
    """The family's text rotary from a small text config, on either
    transformers line (5.x: ``rope_parameters``; 4.x: ``rope_scaling`` and
    ``rope_theta``)."""
    prefix, name, section = FAMILIES[family]
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configuration = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    kwargs = {
        "hidden_size": 4 * head_dim,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
    }
    rope = {"rope_type": "default", "mrope_section": list(section)}
    if transformers_major() >= 5:
        kwargs["rope_parameters"] = dict(rope, rope_theta=theta)
    else:
        kwargs["rope_scaling"] = dict(rope, type="default")
        kwargs["rope_theta"] = theta
    config = getattr(configuration, f"{prefix}TextConfig")(**kwargs)
    return getattr(modeling, name)(config=config).eval()


def mrope_cases():
    """name -> (3, B, S) position_ids, as VL models call their rotary."""
    first = image_prompt_positions(3, (2, 4), 4)  # 15 tokens, positions up to 10
    second = image_prompt_positions(2, (3, 3), 2)  # 13 tokens
    second = torch.cat([second, second[:, -1:] + 1 + torch.arange(2).expand(3, -1)], dim=1)  # pad to 15
    generator = torch.Generator().manual_seed(0)
    deltas = torch.tensor([-4, -6])  # each prompt's rope_delta: max position + 1 - length
    return {
        "text only 3x1x12": torch.arange(12)[None, None].expand(3, 1, -1),
        "text only expanded view 3x2x7": torch.arange(7).view(1, 1, -1).expand(3, 2, -1),
        "image grid 3x1x15": first[:, None],
        "image grids batch 3x2x15": torch.stack([first, second], dim=1),
        "decode after image 3x1x1": torch.full((3, 1, 1), 15 + deltas[0].item()),
        "decode 3x2x1 different rope_deltas": (torch.tensor([40, 40]) + deltas)[None, :, None].expand(3, -1, -1),
        "random axes 3x3x5": torch.randint(0, 3000, (3, 3, 5), generator=generator),
        "int32 3x1x15": first[:, None].to(torch.int32),
        "transposed 3x4x2": torch.randint(0, 50, (3, 2, 4), generator=generator).transpose(1, 2),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_3d_positions_are_answered_from_tables_bit_identically(family, dtype, patched):
    module = mrope_rotary(family)
    for name, positions in mrope_cases().items():
        x = torch.randn(positions.shape[1], positions.shape[2], 8).to(dtype)
        expected = unpatched(module, x, positions)
        for _ in range(2):  # first use (verified), then from the table
            actual = module(x, positions)
            assert rope_patch.identity.difference(expected, actual) is None, name
    assert "M-RoPE" in answered_forms(module)
    positions = mrope_cases()["image grids batch 3x2x15"] + 7
    x = torch.randn(2, 15, 8).to(dtype)
    expected = unpatched(module, x, positions)
    with CallsCos() as spy:
        actual = module(x, positions)
    assert not spy.seen, "a verified 3-D call ran the unpatched forward"
    assert_identical(expected, actual)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_table_serves_2d_and_3d_calls_where_the_forward_takes_both(family, patched):
    module = mrope_rotary(family)
    x = torch.randn(1, 6, 8)
    planar = torch.arange(6)[None] + 3
    try:
        unpatched(module, x, planar)
    except Exception as error:  # noqa: BLE001 - transformers 4.x Qwen2-VL: 3-D only
        module(x, planar[None].expand(3, -1, -1))  # a table built from 3-axis positions
        with pytest.raises(type(error)):
            module(x, planar)
        (table,) = rope_patch.cache_info(module).tables
        assert table.forms == ("M-RoPE",)  # no 2-D form: the table was built from 3-axis positions
        return
    for positions in (planar, planar[None].expand(3, -1, -1), planar):
        assert_identical(unpatched(module, x, positions), module(x, positions))
    (table,) = rope_patch.cache_info(module).tables
    assert set(table.forms) == {"2-D", "M-RoPE"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_axis_counts_match_the_unpatched_result_or_exception(family, patched):
    module = mrope_rotary(family)
    x = torch.randn(2, 5, 8)
    module(x, torch.arange(5).expand(3, 2, -1))
    for axes in (1, 2, 4):
        positions = torch.randint(0, 100, (axes, 2, 5), generator=torch.Generator().manual_seed(axes))
        assert_same_outcome(module, x, positions)
    assert rope_patch.cache_info(module).fallback is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_positions_beyond_the_table_grow_it(family, patched):
    module = mrope_rotary(family, max_position_embeddings=1 << 16)
    x = torch.randn(1, 1, 8, dtype=torch.bfloat16)
    for position in (5, 100, 1000, 5000, 40000):
        positions = torch.tensor([position, position // 2, position // 3]).view(3, 1, 1)
        for _ in range(2):
            assert_identical(unpatched(module, x, positions), module(x, positions))
        (table,) = rope_patch.cache_info(module).tables
        assert position < table.positions <= max(2 * (position + 1), MIN_TABLE)
    assert "M-RoPE" in answered_forms(module)


@pytest.mark.parametrize(
    "positions",
    [
        torch.tensor([[[-1, 0, 1]]]).expand(3, 1, 3),
        torch.tensor([[[0, 1, 2]], [[0, -3, 2]], [[0, 1, 2]]]),
        torch.tensor([[[0.0, 1.5, 2.0]]]).expand(3, 1, 3),
        torch.zeros(3, 2, 0, dtype=torch.long),
        torch.tensor([[[0, 1, 1 << 40]]]).expand(3, 1, 3),
    ],
    ids=["negative", "negative-on-one-axis", "float", "empty", "huge"],
)
def test_unusual_3d_positions_match_the_unpatched_result_or_exception(positions, patched):
    module = mrope_rotary("qwen2_5_vl")
    x = torch.randn(1, 3, 8)
    module(x, torch.arange(3).expand(3, 1, -1))  # a verified form exists: the lean path is live
    module(x, torch.arange(3).expand(3, 1, -1))
    assert_same_outcome(module, x, positions)


def test_positions_beyond_the_cap_take_the_unpatched_path():
    assert rope_patch.patch(max_positions=100)
    module = mrope_rotary("qwen2_vl")
    x = torch.randn(1, 3, 8)
    inside = torch.tensor([[[0, 50, 99]]]).expand(3, 1, 3)
    beyond = torch.tensor([[[0, 50, 99]], [[0, 100, 99]], [[0, 50, 99]]])
    for positions in (inside, beyond, inside):
        assert_identical(unpatched(module, x, positions), module(x, positions))
    (table,) = rope_patch.cache_info(module).tables
    assert table.positions == 100


def test_negative_zero_survives_the_axis_gather(patched):
    """With a negative scale, sin at position 0 is -0.0: the gather must keep
    the sign bit (a masked float sum would turn it into +0.0)."""
    module = mrope_rotary("qwen2_5_vl")
    module.attention_scaling = -1.0
    positions = torch.tensor([[[0, 5]], [[3, 0]], [[0, 0]]])
    x = torch.randn(1, 2, 8)
    expected = unpatched(module, x, positions)
    assert (expected[1] == 0).any() and torch.signbit(expected[1][expected[1] == 0]).all()
    for _ in range(2):
        assert_identical(expected, module(x, positions))
    assert "M-RoPE" in answered_forms(module)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_3d_calls_hold_at_most_twice_the_bytes_of_the_positions_used(family, patched):
    """The 3-D form gathers from the table's own columns: beyond them it
    holds one axis index per column (issue 9: M-RoPE held 4x-8x)."""
    module = mrope_rotary(family, max_position_embeddings=1 << 16)
    row_bytes = 2 * 32 * 4  # cos + sin, head_dim 32, fp32
    for used in (1, 64, 65, 1000, 4097):
        positions = torch.tensor([used - 1, (used - 1) // 2, 0]).view(3, 1, 1)
        x = torch.randn(1, 1, 8)
        for _ in range(2):
            assert_identical(unpatched(module, x, positions), module(x, positions))
        assert "M-RoPE" in answered_forms(module)
        assert held_bytes(module) <= max(2 * used, MIN_TABLE) * row_bytes + 3 * 32 * 8  # + one mask row per axis


# --------------------------------------------------------------------------
# Classes written here: what is learnt comes from behaviour, not from names.


class SelectingRotary(torch.nn.Module):
    """An M-RoPE-like rotary with four axes and an unusual selection: each
    frequency reads axis ``(3 * j + 1) % 4``, and the halves are swapped."""

    axes = 4

    def __init__(self, dim=16):
        super().__init__()
        # register_buffer, not torch.nn.Buffer: the suite runs on torch 2.4 (Buffer is 2.5+).
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self.attention_scaling = 1.0

    def recompose(self, freqs):
        # freqs: (axes, B, S, dim/2) -> (B, S, dim/2), column j from axis (3j+1) % 4
        columns = [freqs[(3 * j + 1) % self.axes, ..., j] for j in range(freqs.shape[-1])]
        return torch.stack(columns, dim=-1)

    def forward(self, x, position_ids):
        position_ids = position_ids.expand(self.axes, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq
        freqs = self.recompose(freqs)
        emb = torch.cat((freqs.flip(-1), freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class MixingRotary(SelectingRotary):
    """Recomposes by averaging two axes: no column is one axis's value."""

    axes = 3

    def recompose(self, freqs):
        return torch.cat([freqs[0, ..., :4], (freqs[1, ..., 4:] + freqs[2, ..., 4:]) / 2], dim=-1)


def install(cls):
    rope_patch.patch_class(cls)


@pytest.mark.parametrize("zero_frequency", [False, True], ids=["", "zero-frequency"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_selecting_rotary_is_learnt_from_its_behaviour(dtype, zero_frequency, patched, caplog):
    """Four axes, an odd selection; with a zero frequency, that column is
    equal on every axis (constant), so any axis is right for it."""
    install(SelectingRotary)
    module = SelectingRotary()
    if zero_frequency:
        module.inv_freq[-1] = 0.0
    generator = torch.Generator().manual_seed(0)
    with caplog.at_level("WARNING", logger="rope_patch"):
        for positions in (
            torch.randint(0, 200, (4, 2, 6), generator=generator),
            torch.arange(6).expand(4, 2, -1),
            torch.randint(0, 200, (4, 3, 1), generator=generator),
        ):
            x = torch.randn(positions.shape[1], positions.shape[2], 8).to(dtype)
            for _ in range(2):
                assert_identical(unpatched(module, x, positions), module(x, positions))
    assert not caplog.records
    assert "M-RoPE" in answered_forms(module)


def test_a_recomposition_that_mixes_axes_falls_back_said_once_at_info(patched, caplog):
    # A decision by design (no table form for such forwards), not a problem to act on: INFO, not WARNING.
    install(MixingRotary)
    module = MixingRotary()
    generator = torch.Generator().manual_seed(0)
    with caplog.at_level("INFO", logger="rope_patch"):
        for positions in (
            torch.arange(5)[None],  # 2-D: all axes equal, cacheable on its own
            torch.randint(0, 100, (3, 2, 5), generator=generator),
            torch.arange(5).expand(3, 2, -1),
            torch.randint(0, 100, (3, 1, 1), generator=generator),
            torch.arange(5)[None],
        ):
            x = torch.randn(positions.shape[-2], positions.shape[-1], 8)
            for _ in range(2):
                assert_identical(unpatched(module, x, positions), module(x, positions))
    said = [r for r in caplog.records if "MixingRotary" in r.getMessage() and "unpatched" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"], [r.getMessage() for r in caplog.records]
    assert "mixes axes" in said[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    info = rope_patch.cache_info(module)
    assert info.fallback and not info.tables
    rows = {row.rotary.cls: row for row in rope_patch.status()}
    assert rows[MixingRotary].status == "fallback" and rows[MixingRotary].reason == info.fallback


# --------------------------------------------------------------------------
# End to end


def tiny_qwen2_vl():
    """A random-weight Qwen2-VL: 2 text layers (head_dim 16, mrope_section
    [2, 3, 3]) and a 1-layer vision tower with 4-pixel patches."""
    import transformers

    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 512,
    }
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    if transformers_major() >= 5:
        text["rope_parameters"] = dict(rope, rope_theta=1e6)
    else:
        text["rope_scaling"] = dict(rope, type="default")
        text["rope_theta"] = 1e6
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "temporal_patch_size": 2,
    }
    config = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=250,
        video_token_id=251,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_generate_with_an_image_is_identical(dtype):
    """Prefill with an image grid, then decode after it (3 x B x 1), two
    prompts whose images sit at different offsets (different rope_deltas):
    same tokens and logits, and the text rotary answered 3-D calls."""
    model = tiny_qwen2_vl().to(dtype)
    image = [252] + [250] * 4 + [253]  # a 4 x 4 patch grid, merged 2 x 2: 4 tokens
    ids = torch.tensor([[5, 6, 7, *image, 8, 9, 10, 17], [1, 2, 11, *image, 12, 13, 14, 15]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    pixel_values = torch.randn(2 * 16, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])

    def greedy():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixel_values,
                image_grid_thw=grid,
                max_new_tokens=12,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        return out.sequences, torch.stack(out.logits)

    reference = greedy()
    assert rope_patch.patch()  # unpatched again by conftest's autouse fixture
    assert_identical(reference, greedy())
    text_rotaries = [m for m in model.modules() if "M-RoPE" in answered_forms(m)]
    assert len(text_rotaries) == 1 and type(text_rotaries[0]).__name__ == "Qwen2VLRotaryEmbedding"
