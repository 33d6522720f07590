"""peft adapters: a LoRA-wrapped model generates and trains exactly as
unpatched, with its rotary answered from tables."""

import pytest
import torch

import rope_patch
from tests import models
from tests.conftest import answered, assert_identical

peft = pytest.importorskip("peft")


def lora_model():
    model = models.causal_lm("LlamaConfig")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_generate_and_training_step_are_identical(patched):
    model = lora_model()
    ids = torch.randint(0, models.TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 8,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        out = model.generate(input_ids=ids, **kwargs)
        with rope_patch.disabled():
            reference = model.generate(input_ids=ids, **kwargs)
    assert_identical(reference.sequences, out.sequences)
    assert_identical(torch.stack(reference.scores), torch.stack(out.scores))
    rotary = model.base_model.model.model.rotary_emb
    assert answered(rotary)
    model.train()
    with rope_patch.disabled():
        reference_loss, reference_grads = step(model, ids)
    loss, grads = step(model, ids)
    assert_identical(reference_loss, loss)
    assert reference_grads.keys() == grads.keys() and any("lora" in name for name in grads)
    for name in grads:
        assert_identical(reference_grads[name], grads[name])
