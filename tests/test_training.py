"""Grad modes, autocast and training: tables built in any mode serve every
other mode, and a training step's loss and every gradient are bit-identical
with and without the patch."""

import pytest
import torch
import transformers

import rope_patch
from rope_patch import cache
from tests.conftest import assert_identical, unpatched
from tests.models import TINY, llama_rotary


def build_modes():
    return {
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
        "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "enable_grad": torch.enable_grad,
    }


@pytest.mark.parametrize("first_mode", list(build_modes()))
def test_table_built_in_one_mode_serves_every_other(patched, first_mode):
    module = llama_rotary()
    x, positions = torch.randn(2, 6, 64), torch.tensor([[0, 1, 2, 3, 4, 5], [9, 90, 900, 4, 4, 2000]])
    with build_modes()[first_mode]():
        first = module(x, positions)
        assert_identical(unpatched(module, x, positions), first)
    table = cache.state_of(module).tables[(x.device, x.dtype, None)]
    assert not any(column.is_inference() for column in table.columns)
    for name, mode in build_modes().items():
        with mode():
            expected = unpatched(module, x, positions)
            actual = module(x, positions)
        assert_identical(expected, actual)
        assert actual[0].is_inference() == expected[0].is_inference(), name
        assert actual[0].requires_grad == expected[0].requires_grad, name


def training_step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config_name", ["LlamaConfig", "Qwen3Config"])
def test_training_step_loss_and_gradients_are_identical(config_name):
    config = getattr(transformers, config_name)(**dict(TINY, head_dim=16))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    reference = []
    for mode in ("train", "eval", "train"):
        getattr(model, mode)()
        reference.append(training_step(model, ids, ids))
    assert rope_patch.patch()
    with torch.inference_mode():  # tables first built under inference mode
        model.eval()(ids)
    for (ref_loss, ref_grads), mode in zip(reference, ("train", "eval", "train")):
        getattr(model, mode)()
        loss, grads = training_step(model, ids, ids)
        assert_identical(ref_loss, loss)
        assert ref_grads.keys() == grads.keys()
        for name in grads:
            assert_identical(ref_grads[name], grads[name])


def test_autocast_training_step_is_identical():
    config = transformers.LlamaConfig(**TINY)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = step()
    assert rope_patch.patch()
    loss, grads = step()
    assert_identical(ref_loss, loss)
    for ref, got in zip(ref_grads, grads):
        assert_identical(ref, got)
