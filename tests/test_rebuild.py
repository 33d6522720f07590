"""Rotaries that rebuild their own cache (rope_patch.cache.rebuild) and
tables shared between per-layer rotaries (rope_patch.cache.shared), in
process: classes defined here in the remote-code styles, patched with
``rope_patch.patch_class``. Every call is compared with an unpatched twin:
outputs, and the module's whole state after it."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
from torch import nn

import rope_patch
from rope_patch.cache.rebuild import METHOD, OWN_CACHE
from rope_patch.cache.state import state_of
from rope_patch.identity import difference
from tests.conftest import assert_identical, module_state


class DeepseekRotaryEmbedding(nn.Module):
    """DeepSeek-V3's: max_seq_len_cached is None after __init__."""

    def __init__(self, dim, max_position_embeddings=64, base=10000):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self._set_cos_sin_cache(seq_len=max_position_embeddings, device=self.inv_freq.device, dtype=torch.float32)
        self.max_seq_len_cached = None

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq.to(t.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


class DeepseekYarnRotaryEmbedding(DeepseekRotaryEmbedding):
    """YaRN's rebuild re-registers inv_freq (same values) every time."""

    def __init__(self, dim, max_position_embeddings=64, base=10000, scaling_factor=4.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        inter = 1.0 / (
            self.scaling_factor * self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        )
        ramp = torch.clamp((torch.arange(self.dim // 2, dtype=torch.float32) - 2) / 6, 0, 1)
        inv_freq = inter * ramp + (1.0 / (self.base ** (torch.arange(0, self.dim, 2) / self.dim))) * (1 - ramp)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        mscale = float(0.1 * math.log(self.scaling_factor) + 1.0)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", (emb.cos() * mscale).to(dtype), persistent=False)
        self.register_buffer("sin_cached", (emb.sin() * mscale).to(dtype), persistent=False)


class LegacyLayoutRotaryEmbedding(DeepseekRotaryEmbedding):
    """transformers 4.3x Llama: cos_cached[None, None] (rows along dim 2), persistent."""

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos()[None, None, :, :].to(dtype))
        self.register_buffer("sin_cached", emb.sin()[None, None, :, :].to(dtype))

    def forward(self, x, seq_len=None):
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:, :, :seq_len, ...].to(dtype=x.dtype), self.sin_cached[:, :, :seq_len, ...]


class DynamicNTKRotaryEmbedding(DeepseekRotaryEmbedding):
    """InternLM2's dynamic NTK rebuild: frequencies follow seq_len past the maximum."""

    def __init__(self, dim, max_position_embeddings=16, base=10000):
        self.max_position_embeddings, self.scaling_factor = max_position_embeddings, 2.0
        super().__init__(dim, max_position_embeddings, base)
        self.max_seq_len_cached = max_position_embeddings

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        if seq_len > self.max_position_embeddings:
            base = self.base * ((self.scaling_factor * seq_len / self.max_position_embeddings) - 1) ** (
                self.dim / (self.dim - 2)
            )
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        super()._set_cos_sin_cache(seq_len, device, dtype)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=torch.float32)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


CLASSES = [DeepseekRotaryEmbedding, DeepseekYarnRotaryEmbedding, LegacyLayoutRotaryEmbedding]
LENGTHS = [5, 6, 7, 40, 3, 41, 100, 100, 2, 300, 301]


@pytest.fixture
def patched_classes(patched):
    for cls in (*CLASSES, DynamicNTKRotaryEmbedding):
        rope_patch.patch_class(cls)


def same_calls(module, twin, lengths, dtype=torch.float32):
    """The patched module and its unpatched twin get the same calls: outputs
    and whole state (non-persistent buffer names and state_dict keys too)
    identical after each."""
    for n in lengths:
        x = torch.randn(1, 2, n, 16).to(dtype)
        with rope_patch.disabled():
            expected = twin(x, seq_len=n)
        assert_identical(expected, module(x, seq_len=n))
        assert module_state(module) == module_state(twin), n
        assert module._non_persistent_buffers_set == twin._non_persistent_buffers_set
        assert list(module.state_dict()) == list(twin.state_dict())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebuilds_are_replayed_from_tables_bit_identically(patched_classes, cls, dtype):
    module, twin = cls(16), cls(16)
    same_calls(module, twin, LENGTHS, dtype)
    info = rope_patch.cache_info(module)
    assert info.answered and {form for table in info.tables for form in table.forms} == {"rebuild"}
    # The calls within the module's own cache are its forward's (nothing to gain).
    assert info.unpatched == (OWN_CACHE,) and info.fallback is None


def test_a_replay_writes_fresh_tensors_never_the_tables(patched_classes):
    module, twin = DeepseekRotaryEmbedding(16), DeepseekRotaryEmbedding(16)
    same_calls(module, twin, [5, 6, 7])  # the first rebuild is verified, then replayed
    (table,) = state_of(module).tables.values()
    storages = {column.untyped_storage().data_ptr() for column in table.columns}
    assert module.cos_cached.untyped_storage().data_ptr() not in storages
    with torch.no_grad():
        module.cos_cached.mul_(0)  # the user's own cache, edited: the table is not
        twin.cos_cached.mul_(0)
    same_calls(module, twin, [6, 8, 9])


def test_rebuilds_outside_the_forward_run_the_original(patched_classes):
    module = DeepseekRotaryEmbedding(16)  # __init__'s rebuild
    module._set_cos_sin_cache(10, torch.device("cpu"), torch.float32)  # anyone's
    assert state_of(module) is None
    assert module.max_seq_len_cached == 10 and module.cos_cached.shape == (10, 16)

    class Other(torch.nn.Module):  # another module's forward calling this one's rebuild
        def forward(self, rotary):
            rotary._set_cos_sin_cache(12, torch.device("cpu"), torch.float32)

    Other()(module)
    assert state_of(module) is None and module.max_seq_len_cached == 12


def test_the_forward_stays_the_classs_own(patched_classes):
    """Only the rebuild is replaced: a call within the module's cache runs
    the class's own forward, nothing in front of it (never slower); a
    subclass's forward reaching the rebuild through super() is answered."""
    from rope_patch.forward import original_of

    assert original_of(DeepseekRotaryEmbedding.__dict__["forward"]) is None
    assert original_of(DeepseekRotaryEmbedding.__dict__[METHOD]) is not None

    class Subclass(DeepseekRotaryEmbedding):
        def forward(self, x, seq_len=None):
            cos, sin = super().forward(x, seq_len)
            return cos * 1, sin * 1

    module, twin = Subclass(16), Subclass(16)
    same_calls(module, twin, [5, 6, 7, 40])
    assert rope_patch.cache_info(module).answered


def test_a_rebuild_class_inheriting_a_wrapped_forward_gets_the_original(patched):
    """A subclass that adds the rebuild to a ``forward(x, seq_len)`` class
    rope_patch wraps: its forward is pinned to the original (only its
    rebuild is answered), as for an excluded subclass."""
    from rope_patch.forward import original_of

    class Slicing(nn.Module):  # slices a cache built in __init__, no rebuild method
        def __init__(self):
            super().__init__()
            self.register_buffer("cos_cached", torch.randn(64, 16), persistent=False)
            self.register_buffer("sin_cached", torch.randn(64, 16), persistent=False)

        def forward(self, x, seq_len=None):
            return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)

    class Rebuilding(Slicing):
        def _set_cos_sin_cache(self, seq_len, device, dtype):
            raise AssertionError("not called here")

    rope_patch.patch_class(Slicing)
    wrapped = Slicing.__dict__["forward"]
    assert original_of(wrapped) is not None
    rope_patch.patch_class(Rebuilding)
    assert Rebuilding.__dict__["forward"] is original_of(wrapped)
    assert original_of(Rebuilding.__dict__[METHOD]) is not None


def test_frequency_state_changes_are_followed(patched_classes):
    module, twin = DeepseekRotaryEmbedding(16), DeepseekRotaryEmbedding(16)
    same_calls(module, twin, [5, 6])
    for m in (module, twin):
        m.inv_freq = m.inv_freq * 2  # a new frequency state: the table must not answer it
    same_calls(module, twin, [7, 8, 70])


def test_inference_mode_and_grad_modes(patched_classes):
    module, twin = DeepseekRotaryEmbedding(16), DeepseekRotaryEmbedding(16)
    with torch.inference_mode():
        same_calls(module, twin, [5, 6])
        assert module.cos_cached.is_inference()
    same_calls(module, twin, [7, 8])
    assert not module.cos_cached.is_inference()


def test_a_rebuild_that_follows_seq_len_is_capped_with_the_reason(patched_classes):
    """Dynamic NTK: rebuilds past the maximum (16) are not the first rows of
    a larger one: computed unpatched, with the reason; the state as unpatched."""
    module, twin = DynamicNTKRotaryEmbedding(16), DynamicNTKRotaryEmbedding(16)
    same_calls(module, twin, [5, 16, 17, 18, 30, 4])
    info = rope_patch.cache_info(module)
    assert not info.answered and info.fallback is None
    (capped,) = [reason for reason in info.unpatched if reason != OWN_CACHE]
    assert capped.startswith(
        f"calls reaching position 16 or beyond are computed unpatched: its cache rebuild ({METHOD}) is not "
        "position-elementwise: "
    ), capped
    (row,) = [row for row in rope_patch.status() if row.rotary.cls is DynamicNTKRotaryEmbedding]
    assert row.status == "fallback" and OWN_CACHE in row.reason and capped in row.reason


def test_a_forward_within_its_own_cache_says_so(patched_classes):
    module = DynamicNTKRotaryEmbedding(16)
    module(torch.zeros(1, 2, 5, 16), seq_len=5)
    assert rope_patch.cache_info(module).unpatched == (OWN_CACHE,)
    (row,) = [row for row in rope_patch.status() if row.rotary.cls is DynamicNTKRotaryEmbedding]
    assert (row.status, row.reason) == ("fallback", OWN_CACHE)


def test_unpatch_restores_the_rebuild_method(patched_classes):
    from rope_patch.forward import original_of

    replaced = DeepseekYarnRotaryEmbedding.__dict__[METHOD]
    original = original_of(replaced)
    assert original is not None and replaced.__wrapped__ is original
    rope_patch.unpatch()
    assert DeepseekYarnRotaryEmbedding.__dict__[METHOD] is original
    assert original_of(DeepseekRotaryEmbedding.__dict__["forward"]) is None


# --------------------------------------------------------------------------
# Shared tables


class PerLayerRotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def test_per_layer_rotaries_of_equal_state_share_columns_and_keep_their_own_watch(patched):
    rope_patch.patch_class(PerLayerRotaryEmbedding)
    layers = [PerLayerRotaryEmbedding(16) for _ in range(4)] + [PerLayerRotaryEmbedding(16, base=500.0)]
    x, positions = torch.zeros(1, 10, 16), torch.arange(10)[None]
    for layer in layers:
        assert_identical(PerLayerRotaryEmbedding.forward.__wrapped__(layer, x, positions), layer(x, positions))
    tables = [next(iter(state_of(layer).tables.values())) for layer in layers]
    assert all(table.columns is tables[0].columns for table in tables[:4])
    assert tables[4].columns is not tables[0].columns  # another base: its own
    assert len({id(table.watch) for table in tables}) == 5 and len({id(table.forms[2]) for table in tables}) == 5
    columns = tables[0].columns
    del tables  # only the modules' states hold tables (a group counts the live ones)
    infos = [rope_patch.cache_info(layer) for layer in layers]
    assert [info.tables[0].shared_by for info in infos] == [4, 4, 4, 4, 1]
    one_table = 64 * 16 * 4 * 2
    assert sum(info.bytes for info in infos[:4]) == one_table and infos[4].bytes == one_table
    # One layer's frequencies change: it sees it (its own watch) and leaves the group.
    layers[1].inv_freq = layers[1].inv_freq * 3
    assert_identical(PerLayerRotaryEmbedding.forward.__wrapped__(layers[1], x, positions), layers[1](x, positions))
    assert next(iter(state_of(layers[1]).tables.values())).columns is not columns
    assert [rope_patch.cache_info(layer).tables[0].shared_by for layer in layers[:4]] == [3, 1, 3, 3]


class BaichuanRotaryEmbedding(nn.Module):
    """Baichuan2-7B's: a cache built in __init__, rebuilt inline by the
    forward (no _set_cos_sin_cache) when a call passes it."""

    def __init__(self, dim, max_position_embeddings=32):
        super().__init__()
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.max_seq_len_cached = max_position_embeddings
        freqs = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cached, self.sin_cached = emb.cos()[None, None], emb.sin()[None, None]

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self.max_seq_len_cached = seq_len
            freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos_cached, self.sin_cached = emb.cos()[None, None], emb.sin()[None, None]
        return self.cos_cached[:, :, :seq_len, ...], self.sin_cached[:, :, :seq_len, ...]


def test_an_inline_rebuild_gets_a_true_reason(patched):
    """No rebuild method to answer: tables would have to be built from a
    forward that grows its own cache past it, and only slices it below."""
    rope_patch.patch_class(BaichuanRotaryEmbedding)
    module, twin = BaichuanRotaryEmbedding(16), BaichuanRotaryEmbedding(16)
    same_calls(module, twin, [5, 6, 40, 41, 3])
    reason = rope_patch.cache_info(module).fallback
    assert reason == (
        "the forward changes the module's own state when called with seq_len=64 (cos_cached, max_seq_len_cached, "
        "sin_cached); with fewer positions, the forward only gathers rows of its precomputed cos_cached, "
        "sin_cached: nothing to gain"
    ), reason


# --------------------------------------------------------------------------
# What a rebuild reads, and whose state learning touches


class Fp32RotaryEmbedding(nn.Module):
    """Keeps its frequencies in fp32 after ``.to(bfloat16)``: the rebuild
    reads inv_freq, then writes it back converted (Qwen3-VL-style)."""

    def __init__(self, dim=16, base=10000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self.max_seq_len_cached = None

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
        self.max_seq_len_cached = seq_len
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        emb = torch.cat((torch.outer(t, self.inv_freq),) * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]


def test_a_key_the_rebuild_reads_then_writes_is_watched_on_its_value_before_the_call(patched):
    """inv_freq is read (its dtype, its values) before the rebuild writes
    it: an input, not only an output. A new inv_freq must be seen (it was
    dropped from the watch: the old tables answered, and wrote the old
    inv_freq back over the user's)."""
    rope_patch.patch_class(Fp32RotaryEmbedding)
    module, twin = Fp32RotaryEmbedding().to(torch.bfloat16), Fp32RotaryEmbedding().to(torch.bfloat16)
    same_calls(module, twin, [4, 5, 6, 9], torch.bfloat16)
    assert rope_patch.cache_info(module).answered
    for m in (module, twin):  # new frequencies, in the module's dtype again
        m.inv_freq = (m.inv_freq * 0.25).bfloat16()
    same_calls(module, twin, [10, 11, 30], torch.bfloat16)


#: Set by a test: pauses OwnCacheRotaryEmbedding's rebuild of one position
#: (only learning runs one) so that the test can look at the module then.
GATE: dict = {}


class OwnCacheRotaryEmbedding(nn.Module):
    """InternLM2's: a cache built in __init__ for max_position_embeddings,
    rebuilt by the forward only past it."""

    def __init__(self, dim=16, max_position_embeddings=64, base=10000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self._set_cos_sin_cache(seq_len=max_position_embeddings, device=self.inv_freq.device, dtype=torch.float32)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        emb = torch.cat((torch.outer(t, self.inv_freq),) * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)
        if seq_len == 1 and GATE and not GATE["reached"].is_set():
            GATE["reached"].set()
            GATE["release"].wait(30)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=torch.float32)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


@pytest.fixture
def paused_learning(patched):
    """An OwnCacheRotaryEmbedding, its twin, and a thread whose call of 100
    positions learns the rebuild, paused at its run of one position."""
    rope_patch.patch_class(OwnCacheRotaryEmbedding)
    module, twin = OwnCacheRotaryEmbedding(), OwnCacheRotaryEmbedding()
    GATE.update(reached=threading.Event(), release=threading.Event())
    long = torch.randn(1, 2, 100, 16)
    results = []
    thread = threading.Thread(target=lambda: results.append(module(long, seq_len=100)))
    thread.start()
    try:
        assert GATE["reached"].wait(30), "learning never ran the rebuild for one position"
        yield module, twin, long, results
    finally:
        GATE["release"].set()
        thread.join(60)
        GATE.clear()


def test_learning_never_changes_the_module_another_thread_uses(paused_learning):
    """Learning runs the rebuild at sizes nobody asked for (here: one
    position): on the live module, another thread's forward saw it shrunk
    (max_seq_len_cached = 1) and rebuilt, or sliced one row. It learns on a
    private copy: the module stays as unpatched leaves it throughout."""
    module, twin, long, results = paused_learning
    assert module_state(module) == module_state(twin)  # mid-learning, as before the call
    short = torch.randn(1, 2, 8, 16)
    with rope_patch.disabled():
        expected = twin(short, seq_len=8)
    assert_identical(expected, module(short, seq_len=8))  # the cache of __init__, not a lock wait
    GATE["release"].set()
    with rope_patch.disabled():
        expected = twin(long, seq_len=100)
    while not results:
        time.sleep(0.01)
    assert_identical(expected, results[0])
    assert module_state(module) == module_state(twin)
    assert rope_patch.cache_info(module).tables


# --------------------------------------------------------------------------
# fork() and threads


def run_in_fork(child) -> int:
    """``child()`` (True when it passed) in a forked child; its exit code
    (1: failed or raised, 2: deadlocked, killed after 60 s)."""
    pid = os.fork()
    if pid == 0:
        # One intra-op thread, as pytest-xdist's workers run (conftest): a
        # child of a parent whose OpenMP pool is up cannot use another.
        torch.set_num_threads(1)
        try:
            ok = child()
        except BaseException:  # noqa: BLE001 - any failure is the child's answer
            ok = False
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 2
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_fork_while_a_table_is_published_leaves_the_child_the_shared_tables_lock(patched_classes):
    """rope_patch.cache.shared's lock, held by another thread (publishing or
    adopting a table) at fork(), is the child's own: its first table build
    does not wait forever."""
    from rope_patch.cache import shared

    holding, release = threading.Event(), threading.Event()

    def holder():
        with shared._lock:
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(10)

        def child():
            module, twin = DeepseekRotaryEmbedding(16), DeepseekRotaryEmbedding(16)
            same_calls(module, twin, [5, 6])
            return rope_patch.cache_info(module).answered

        assert run_in_fork(child) == 0
    finally:
        release.set()
        thread.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_fork_while_learning_leaves_the_child_the_module_as_it_was(paused_learning):
    """The child of a fork() made while another thread learns has the
    module as unpatched leaves it (not the probe's state), and its own first
    rebuild works (the state's lock is the child's own)."""
    module, twin, *_ = paused_learning

    def child():
        if module_state(module) != module_state(twin):
            return False
        x = torch.randn(1, 2, 90, 16)
        with rope_patch.disabled():
            expected = twin(x, seq_len=90)
        return difference(expected, module(x, seq_len=90)) is None and module_state(module) == module_state(twin)

    assert run_in_fork(child) == 0
