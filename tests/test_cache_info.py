"""rope_patch.cache_info: what a module holds, through the public API."""

import torch

import rope_patch
from tests.models import llama_rotary


def test_cache_info_reports_tables_after_use(patched):
    module = llama_rotary()
    assert rope_patch.cache_info(module) == rope_patch.CacheInfo(tables=(), fallback=None)
    x = torch.randn(1, 3, 64)
    module(x, torch.arange(3)[None])
    info = rope_patch.cache_info(module)
    assert info.answered and info.fallback is None
    (table,) = info.tables
    assert (table.device, table.dtype, table.layer_type) == (torch.device("cpu"), torch.float32, None)
    assert table.positions >= 3 and table.verified and "2-D" in table.forms
    assert info.bytes == table.bytes == table.positions * 2 * 16 * 4  # cos + sin, head_dim 16, fp32
