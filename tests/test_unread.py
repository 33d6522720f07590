"""``forward(x, position_ids, seq_len=None)`` called with seq_len (Phi-3's
remote attention passes it on every call): answered when the bytecode
proves the forward never reads it (rope_patch.unread), else computed
unpatched with the reason, which status() and cache_info report."""

from __future__ import annotations

import torch
from torch import nn

import rope_patch
from rope_patch.cache.state import SEQ_LEN_READ
from rope_patch.unread import never_read
from tests.conftest import assert_identical


def ignores(self, x, position_ids, seq_len=None):
    return position_ids


def overwrites(self, x, position_ids, seq_len=None):
    seq_len = torch.max(position_ids) + 1
    return seq_len


@torch.no_grad()
def decorated(self, x, position_ids, seq_len=None):
    return position_ids


def reads(self, x, position_ids, seq_len=None):
    if seq_len is not None:
        pass
    return position_ids


def stores_after_a_branch(self, x, position_ids, seq_len=None):
    if x is None:
        seq_len = 1
    return seq_len


def stores_in_a_try(self, x, position_ids, seq_len=None):
    try:
        seq_len = 1
    except ValueError:
        return seq_len
    return seq_len


def closes_over(self, x, position_ids, seq_len=None):
    return lambda: seq_len


def reads_locals_first(self, x, position_ids, seq_len=None):
    found = locals()
    seq_len = 1
    return found, seq_len


def other_decorator(function):
    def wrapper(self, x, position_ids, seq_len=None):
        return function(self, x, position_ids, seq_len if seq_len is None else seq_len + 1)

    wrapper.__wrapped__ = function
    return wrapper


def test_the_proof_accepts_only_what_it_can_prove():
    assert never_read(ignores, "seq_len") and never_read(overwrites, "seq_len") and never_read(decorated, "seq_len")
    for function in (reads, stores_after_a_branch, stores_in_a_try, closes_over, reads_locals_first):
        assert not never_read(function, "seq_len"), function.__name__
    assert not never_read(other_decorator(ignores), "seq_len")  # a wrapper of unknown kind reads it
    assert not never_read(ignores, "layer_type")  # no such parameter


class Rotary(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)

    def compute(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class IgnoringRotaryEmbedding(Rotary):
    def forward(self, x, position_ids, seq_len=None):
        return self.compute(x, position_ids)


class ReadingRotaryEmbedding(Rotary):
    def forward(self, x, position_ids, seq_len=None):
        if seq_len is not None:
            pass  # transformers 4.38 warned that it is deprecated
        return self.compute(x, position_ids)


def test_calls_passing_seq_len(patched):
    x, positions = torch.zeros(1, 6, 16), torch.arange(6)[None]
    ignoring, reading = IgnoringRotaryEmbedding(), ReadingRotaryEmbedding()
    for module in (ignoring, reading):
        rope_patch.patch_class(type(module))
        for _ in range(2):
            expected = type(module).forward.__wrapped__(module, x, positions, 6)
            assert_identical(expected, module(x, positions, seq_len=6))
    assert rope_patch.cache_info(ignoring).answered
    reading_info = rope_patch.cache_info(reading)
    assert not reading_info.tables and reading_info.unpatched == (SEQ_LEN_READ,)
    rows = {row.rotary.name: row for row in rope_patch.status()}
    assert (rows["IgnoringRotaryEmbedding"].status, rows["IgnoringRotaryEmbedding"].reason) == ("cached", "")
    assert (rows["ReadingRotaryEmbedding"].status, rows["ReadingRotaryEmbedding"].reason) == ("fallback", SEQ_LEN_READ)
    assert (
        rows["IgnoringRotaryEmbedding"].rotary.unread_seq_len
        and not rows["ReadingRotaryEmbedding"].rotary.unread_seq_len
    )
    # Calls without seq_len are answered: the class is cached again, the module says what it hands over.
    reading(x, positions)
    reading(x, positions)
    assert rope_patch.cache_info(reading).answered and rope_patch.cache_info(reading).unpatched == (SEQ_LEN_READ,)
    row = next(row for row in rope_patch.status() if row.rotary.name == "ReadingRotaryEmbedding")
    assert (row.status, row.reason) == ("cached", "")
