"""Other wrappers on the same forward: a wrapt wrapper applied before or
after rope_patch keeps working, the tables still serve, and unpatch leaves
the other wrapper in place."""

import torch
import wrapt

import rope_patch
from tests.conftest import answered, assert_identical, unpatched
from tests.models import llama_rotary


def llama_class():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding


def counting_wrapper(counter):
    def wrapper(wrapped, instance, args, kwargs):
        counter.append(1)
        return wrapped(*args, **kwargs)

    return wrapper


def exercise(module):
    x, pos = torch.randn(2, 7, 64), torch.arange(7)[None].expand(2, -1) + 11
    expected = unpatched(module, x, pos)
    for _ in range(3):
        assert_identical(expected, module(x, pos))
    assert answered(module)


def test_foreign_wrapper_applied_before_patch():
    cls = llama_class()
    original = cls.__dict__["forward"]
    calls = []
    wrapt.wrap_function_wrapper(cls, "forward", counting_wrapper(calls))
    foreign = cls.__dict__["forward"]
    try:
        assert rope_patch.patch()
        exercise(llama_rotary())
        assert calls  # the foreign wrapper ran when rope_patch computed unpatched
        rope_patch.unpatch()
        assert cls.__dict__["forward"] is foreign
    finally:
        cls.forward = original


def test_foreign_wrapper_applied_after_patch():
    cls = llama_class()
    original = cls.__dict__["forward"]
    calls = []
    try:
        assert rope_patch.patch()
        ours = cls.__dict__["forward"]
        wrapt.wrap_function_wrapper(cls, "forward", counting_wrapper(calls))
        module = llama_rotary()
        exercise(module)
        assert len(calls) >= 3  # outermost: it sees every call
        assert cls.__dict__["forward"].__wrapped__ is ours
    finally:
        rope_patch.unpatch()
        cls.forward = original
