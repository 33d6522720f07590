"""Continuous batching with rope_patch: ``model.generate_batch`` (paged
attention, the path ``transformers serve --continuous-batching`` takes)
gives the same tokens with and without the patch, and the rotary answers
from its cos/sin tables.

Builds a small random-weight Qwen3 from a config (nothing is downloaded),
generates greedily for four prompts of different lengths, which the batching
loop packs into one row of position_ids, first unpatched, then patched.

    .venv/bin/python examples/continuous_batching.py

On CPU without psutil, transformers 5.x logs "Cannot get memory breakdown on
CPU without psutil" (harmless: the cache is sized explicitly here).

Note: the batching loop runs in a thread of its own, so
``rope_patch.disabled()`` around ``generate_batch`` (it is per thread) does
not reach it; the reference here is a run made before ``patch()``.
"""

import torch
import transformers

import rope_patch

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 17, 9, 30)
V5 = int(transformers.__version__.split(".")[0]) >= 5


def build_model():
    config = transformers.Qwen3Config(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    attention = "paged|eager" if V5 else "sdpa_paged"  # paged attention, as continuous batching needs
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def generate_batch(model, prompts):
    """Greedy continuous batching: a list of (tokens, log-probabilities) per prompt."""
    if V5:
        config = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
        batching = transformers.ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256, return_logprobs=True)
        outputs = model.generate_batch(
            prompts, generation_config=config, continuous_batching_config=batching, max_new_tokens=NEW_TOKENS
        )
    else:  # 4.57: the cache size goes in the generation config; no log-probabilities are returned
        config = transformers.GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=0, num_blocks=16, max_batch_tokens=256
        )
        outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False, max_new_tokens=NEW_TOKENS)
    for output in outputs.values():
        assert output.error is None, output.error
    return [(output.generated_tokens, output.logprobs) for output in outputs.values()]


def allow_cpu_on_4_57():
    """transformers 4.57 sizes the paged cache from the device's total
    memory, which it reports as None for the CPU (TypeError in the batching
    thread); report 8 GiB. 5.x runs on CPU as is."""
    if V5:
        return
    from transformers.generation.continuous_batching import cache

    cache.get_device_and_memory_breakdown = lambda: (torch.device("cpu"), 8 << 30, 0, 0)


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    allow_cpu_on_4_57()
    model = build_model()
    rotary = model.model.rotary_emb
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 1000, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]

    unpatched = generate_batch(model, prompts)
    print(f"unpatched: answered from tables: {rope_patch.cache_info(rotary).answered}")

    rope_patch.patch()  # or: import rope_patch.auto, or run the program under `rope-patch run --`
    patched = generate_batch(model, prompts)

    tokens_identical = [t for t, _ in patched] == [t for t, _ in unpatched]
    print(f"tokens identical: {tokens_identical} ({len(prompts)} requests, {NEW_TOKENS} greedy tokens each)")
    if V5:
        print(f"log-probabilities identical: {[p for _, p in patched] == [p for _, p in unpatched]}")
    info = rope_patch.cache_info(rotary)
    print(f"patched: {type(rotary).__name__} answered from tables: {info.answered}")
    for table in info.tables:
        print(
            f"  table: {table.device} {str(table.dtype).replace('torch.', '')}, layer type {table.layer_type}, "
            f"positions 0..{table.positions - 1}, {table.bytes} bytes, verified {table.verified}, forms {table.forms}"
        )
    assert tokens_identical and info.answered


if __name__ == "__main__":
    main()
