"""Rotaries that rebuild their own cache (rope_patch.cache.rebuild) on the
paths real programs take: torch.compile, jit.trace, torch.func, training
with a learnable ``inv_freq``, ``.to(dtype)``. Each runs the same calls on
an unpatched twin; outputs and the module's whole state must be identical.

The rebuild is answered only when the module's own forward calls it (read
from the caller's frame); under a tracer or transform it must run the
original, as the rest of rope_patch does (rope_patch.cache.rule)."""

from __future__ import annotations

import pytest
import torch

import rope_patch
from rope_patch.cache.state import state_of
from tests.conftest import assert_identical, module_state, unpatched_or_skip
from tests.test_rebuild import DeepseekRotaryEmbedding, DeepseekYarnRotaryEmbedding, same_calls

LENGTHS = [5, 6, 7, 9]


def x_of(n, dtype=torch.float32):
    return torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(n)).to(dtype)


def run(call, module, lengths=LENGTHS):
    """``call(module, x, n)`` for each length (a decode loop's growing
    sequence: a rebuild at every call); the outputs and the state after."""
    return [call(module, x_of(n), n) for n in lengths], module_state(module)


def patch_rebuild_classes():
    assert rope_patch.patch()
    for cls in (DeepseekRotaryEmbedding, DeepseekYarnRotaryEmbedding):
        rope_patch.patch_class(cls)


@pytest.fixture
def unpatch_after():
    yield
    rope_patch.unpatch()
    torch._dynamo.reset()


def same(expected, actual):
    (outputs, state), (patched_outputs, patched_state) = expected, actual
    assert len(outputs) == len(patched_outputs)
    for one, other in zip(outputs, patched_outputs):
        assert_identical(one, other)
    assert state == patched_state


def test_torch_compile_of_a_forward_that_rebuilds_its_cache(unpatch_after):
    """Dynamo traces the original rebuild (the context check comes before
    the caller's frame is read): the compiled calls and the module's state
    are those of the unpatched compiled module, and eager calls afterwards
    are answered from tables."""

    def compiled(module, x, n):
        return torch.compile(module, backend="eager")(x, seq_len=n)

    def unpatched():
        torch._dynamo.reset()
        return run(compiled, DeepseekRotaryEmbedding(16))

    expected = unpatched_or_skip("torch.compile of a forward that rebuilds its cache", unpatched)
    torch._dynamo.reset()
    patch_rebuild_classes()
    module = DeepseekRotaryEmbedding(16)
    same(expected, run(compiled, module))
    assert not rope_patch.cache_info(module).answered  # dynamo saw the original
    twin = DeepseekRotaryEmbedding(16)
    same_calls(module, twin, [20, 21, 22])
    assert rope_patch.cache_info(module).answered


def test_jit_trace_records_the_original_rebuild(unpatch_after):
    def traced(module, x, n):
        function = torch.jit.trace(lambda x: module(x, seq_len=n), (x,), check_trace=False)
        return function(x)

    expected = unpatched_or_skip(
        "torch.jit.trace of a forward that rebuilds its cache", lambda: run(traced, DeepseekRotaryEmbedding(16))
    )
    patch_rebuild_classes()
    module = DeepseekRotaryEmbedding(16)
    same(expected, run(traced, module))
    assert state_of(module) is None  # the tracer's calls never reached a table


def test_vmap_runs_the_original_rebuild(unpatch_after):
    def mapped(module, x, n):
        xs = torch.stack([x, x + 1])
        return torch.func.vmap(lambda x: x[..., :16] * module(x, seq_len=n)[0])(xs)

    expected = unpatched_or_skip(
        "torch.func.vmap over a forward that rebuilds its cache", lambda: run(mapped, DeepseekRotaryEmbedding(16))
    )
    patch_rebuild_classes()
    module = DeepseekRotaryEmbedding(16)
    same(expected, run(mapped, module))
    assert state_of(module) is None


def learnable(module):
    """``inv_freq`` made a trainable parameter (a learnable-RoPE experiment)."""
    inv_freq = module.inv_freq
    del module.inv_freq
    module.inv_freq = torch.nn.Parameter(inv_freq.clone())
    return module


def test_training_a_learnable_inv_freq_gets_the_unpatched_gradients(patched):
    rope_patch.patch_class(DeepseekRotaryEmbedding)
    module, twin = learnable(DeepseekRotaryEmbedding(16)), learnable(DeepseekRotaryEmbedding(16))
    for n in LENGTHS:
        x = x_of(n)
        with rope_patch.disabled():
            expected = twin(x, seq_len=n)
        got = module(x, seq_len=n)
        assert_identical(expected, got)
        (expected[0].sum() + expected[1].square().sum()).backward()
        (got[0].sum() + got[1].square().sum()).backward()
        assert_identical(twin.inv_freq.grad, module.inv_freq.grad)
        assert module_state(module) == module_state(twin)
    # Without grad the same parameter is only read: tables answer.
    with torch.no_grad():
        same_calls(module, twin, [20, 21, 22])
    assert rope_patch.cache_info(module).answered


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_dtype_move_is_followed(patched, dtype):
    """``.to(dtype)`` replaces inv_freq and the caches: the tables built
    before are not used for the new state."""
    rope_patch.patch_class(DeepseekYarnRotaryEmbedding)
    module, twin = DeepseekYarnRotaryEmbedding(16), DeepseekYarnRotaryEmbedding(16)
    same_calls(module, twin, [5, 6, 7])
    module.to(dtype)
    twin.to(dtype)
    same_calls(module, twin, [8, 9, 40], dtype)


def test_an_accelerate_hook_keeps_the_rebuild_answered(patched):
    """accelerate's hooks replace ``module.forward`` on the instance with a
    function that calls the class's forward: the rebuild is still called by
    that forward (its caller's frame), so it is answered, as unpatched."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    rope_patch.patch_class(DeepseekRotaryEmbedding)
    module, twin = DeepseekRotaryEmbedding(16), DeepseekRotaryEmbedding(16)
    for m in (module, twin):
        add_hook_to_module(m, ModelHook())

    def state(m):  # the hook's own per-instance forward differs between the two
        return {name: value for name, value in module_state(m).items() if name != "forward"}

    for n in [5, 6, 7, 40]:
        x = x_of(n)
        with rope_patch.disabled():
            expected = twin(x, seq_len=n)
        assert_identical(expected, module(x, seq_len=n))
        assert state(module) == state(twin), n
    assert rope_patch.cache_info(module).answered
