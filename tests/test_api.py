"""patch / unpatch / disabled: idempotence, exact restoration, no double wrap,
and a module's registered state untouched."""

import copy
import io
import logging
import pickle

import torch

import rope_patch
from rope_patch.forward import original_of
from tests.conftest import assert_identical, held_bytes, unpatched
from tests.models import llama_rotary


def _llama_class():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding


def test_patch_wraps_and_unpatch_restores_the_same_function_object():
    cls = _llama_class()
    before = cls.__dict__["forward"]
    assert rope_patch.patch()
    wrapped = cls.__dict__["forward"]
    assert wrapped is not before
    assert wrapped.__wrapped__ is before
    assert original_of(wrapped) is before
    assert rope_patch.unpatch()
    assert cls.__dict__["forward"] is before


def test_patch_twice_and_unpatch_twice_are_noops_with_a_warning(caplog):
    cls = _llama_class()
    before = cls.__dict__["forward"]
    assert rope_patch.patch()
    wrapped = cls.__dict__["forward"]
    with caplog.at_level(logging.WARNING, logger="rope_patch"):
        assert rope_patch.patch() is False
    assert "already patched" in caplog.text
    assert cls.__dict__["forward"] is wrapped
    assert original_of(wrapped) is before  # not double-wrapped
    assert rope_patch.unpatch()
    with caplog.at_level(logging.WARNING, logger="rope_patch"):
        assert rope_patch.unpatch() is False
    assert "not patched" in caplog.text
    assert cls.__dict__["forward"] is before


def test_patch_unpatch_patch_cycles():
    cls = _llama_class()
    before = cls.__dict__["forward"]
    module = llama_rotary()
    x, pos = torch.randn(1, 4, 64), torch.arange(4)[None]
    for _ in range(3):
        assert rope_patch.patch()
        assert_identical(unpatched(module, x, pos), module(x, pos))
        assert rope_patch.unpatch()
        assert cls.__dict__["forward"] is before


def test_disabled_runs_the_original(patched):
    module = llama_rotary()
    x, pos = torch.randn(1, 4, 64), torch.arange(4)[None]
    module(x, pos)
    bytes_before = held_bytes(module)
    with rope_patch.disabled():
        with rope_patch.disabled():  # nests
            module(x, torch.arange(4000)[None])
        module(x, torch.arange(4000)[None])
    assert held_bytes(module) == bytes_before  # no table grew
    module(x, pos)


def test_subclass_inheriting_a_wrapped_forward_is_not_wrapped_again(patched):
    cls = _llama_class()

    class Child(cls):
        pass

    assert "forward" not in Child.__dict__
    module = Child(llama_rotary().config)
    x, pos = torch.randn(2, 5, 64), torch.arange(5)[None].expand(2, -1)
    assert_identical(unpatched(module, x, pos), module(x, pos))


def test_subclass_overriding_forward_via_super_gets_its_own_semantics(patched):
    cls = _llama_class()

    class Shifted(cls):
        def forward(self, x, position_ids):
            return super().forward(x, position_ids + 3)

    module = Shifted(llama_rotary().config)
    x, pos = torch.randn(1, 5, 64), torch.arange(5)[None]
    with rope_patch.disabled():
        reference = module(x, pos)
    assert_identical(reference, module(x, pos))
    assert rope_patch.cache_info(module).tables == ()  # super() call went straight through


def test_excluded_subclass_of_a_patched_class_is_pinned_to_the_original():
    assert rope_patch.patch(exclude="SyntheticChildRotaryEmbedding")
    cls = _llama_class()
    child = type("SyntheticChildRotaryEmbedding", (cls,), {"__module__": cls.__module__})
    assert rope_patch.patch_class(child).status == "excluded"
    assert child.__dict__["forward"] is original_of(cls.__dict__["forward"])
    rope_patch.unpatch()
    assert "forward" not in child.__dict__


def test_exclude_argument_leaves_the_class_alone():
    cls = _llama_class()
    before = cls.__dict__["forward"]
    assert rope_patch.patch(exclude=["LLAMA"])
    assert cls.__dict__["forward"] is before
    statuses = {row.rotary.cls: row for row in rope_patch.status()}
    assert statuses[cls].status == "excluded"


def test_registered_state_unchanged_and_serialisation_carries_no_tables(patched):
    module = llama_rotary()
    reference = llama_rotary()
    x, pos = torch.randn(1, 8, 64), torch.arange(8)[None]
    module(x, pos)
    module(x.bfloat16(), pos)
    assert module.state_dict().keys() == reference.state_dict().keys()
    assert [n for n, _ in module.named_buffers()] == [n for n, _ in reference.named_buffers()]
    assert list(module.parameters()) == []
    assert set(vars(module)) == set(vars(reference))

    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert set(vars(clone)) == set(vars(reference))
        assert_identical(unpatched(module, x, pos), clone(x, pos))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_identical(unpatched(module, x, pos), loaded(x, pos))


def test_status_reports_cached_classes(patched):
    rows = {row.rotary.name: row for row in rope_patch.status()}
    assert rows["LlamaRotaryEmbedding"].status == "cached"
    assert rows["LlamaRotaryEmbedding"].as_dict()["model_type"] == "llama"


def test_deleted_module_frees_its_tables(patched):
    import gc

    from rope_patch import cache

    module = llama_rotary()
    module(torch.randn(1, 4, 64), torch.arange(4)[None])
    key = id(module)
    assert key in cache.states
    del module
    gc.collect()
    assert key not in cache.states
