"""Quiet by default, verbose on request: designed fallbacks are said at INFO,
so a user who configured nothing sees nothing; ROPE_PATCH_VERBOSITY=info
makes rope_patch say each table it builds and each class it leaves to the
unpatched forward, with the reason. Child processes: logging configuration
is process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import subprocess_env

#: A Qwen2-VL generate with an image: its vision rotary falls back by design
#: (per-patch coordinates), its text rotary answers 3-D calls from tables.
GENERATE_WITH_AN_IMAGE = """
import torch
import rope_patch.auto
from tests.test_mrope import tiny_qwen2_vl

model = tiny_qwen2_vl()
image = [252] + [250] * 4 + [253]
ids = torch.tensor([[5, 6, 7, *image, 8, 9]])
pixel_values = torch.randn(16, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
        image_grid_thw=torch.tensor([[1, 4, 4]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
    )
print("done")
"""


def run(code, **env):
    # transformers' own messages are silenced: what is left on stderr is rope_patch's.
    env = subprocess_env(TRANSFORMERS_VERBOSITY="error", **env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done")
    return result.stderr


def test_a_generate_whose_vision_rotary_falls_back_by_design_writes_nothing_to_stderr():
    assert run(GENERATE_WITH_AN_IMAGE) == ""


def test_verbosity_info_says_each_table_built_and_each_class_computed_unpatched():
    said = run(GENERATE_WITH_AN_IMAGE, ROPE_PATCH_VERBOSITY="info").splitlines()
    built = [line for line in said if "Qwen2VLRotaryEmbedding: table built on cpu for float32" in line]
    assert built and "bytes" in built[0] and "positions 0.." in built[0], said
    # Qwen2VLVisionRotaryEmbedding on 5.x (computed unpatched at run time), VisionRotaryEmbedding on 4.57 (left
    # unpatched at import: its signature takes no positions).
    vision = [line for line in said if "VisionRotaryEmbedding " in line]
    assert vision and "vision rotary on per-patch coordinates" in vision[0], said
    assert all(line.startswith("rope_patch: ") for line in said), said


def test_verbosity_error_silences_warnings_and_the_default_keeps_them():
    code = """
    import rope_patch
    rope_patch.patch()
    rope_patch.patch()  # a second call: a warning
    print("done")
    """
    assert "already patched" in run(code)
    assert run(code, ROPE_PATCH_VERBOSITY="error") == ""


@pytest.mark.parametrize("verbosity", ["INFO", "debug"])
def test_a_handler_is_added_once_and_messages_are_not_printed_twice(verbosity):
    code = """
    import logging
    logging.basicConfig(format="root: %(message)s")  # an application that configured logging
    import rope_patch
    rope_patch.patch()
    rope_patch.unpatch()
    rope_patch.patch()
    rope_patch.patch()
    print("done")
    """
    said = run(code, ROPE_PATCH_VERBOSITY=verbosity).splitlines()
    assert said.count("rope_patch: already patched; patch() ignored") == 1, said
    assert not [line for line in said if line.startswith("root: ")], said
