"""rope_patch in 30 seconds: greedy generation with and without the patch
gives the same tokens.

Builds a small random-weight Qwen3 model from a config (nothing is
downloaded), generates 64 tokens greedily with rope_patch active and again
inside ``rope_patch.disabled()`` (the original forwards), checks the tokens
are identical and prints the time per token of each.

    python examples/quickstart.py
"""

import time

import torch
import transformers

import rope_patch

NEW_TOKENS = 64
ROUNDS = 3  # alternating timed runs per variant; the best one is reported


def build_model():
    config = transformers.Qwen3Config(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def generate(model, prompt):
    """Greedy tokens and milliseconds per new token."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed_ms = (time.perf_counter() - start) * 1e3
    return out[0, prompt.shape[1] :].tolist(), elapsed_ms / NEW_TOKENS


def main():
    rope_patch.patch()  # or: import rope_patch.auto (before or after importing transformers)
    model = build_model()
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    patched_tokens, _ = generate(model, prompt)  # warm-up; builds the cos/sin tables
    with rope_patch.disabled():
        unpatched_tokens, _ = generate(model, prompt)
    assert patched_tokens == unpatched_tokens, "patched generation differs from unpatched"

    timings = {"patched": [], "unpatched": []}
    for _ in range(ROUNDS):  # alternate, so machine noise hits both alike
        tokens, ms = generate(model, prompt)
        assert tokens == patched_tokens
        timings["patched"].append(ms)
        with rope_patch.disabled():
            tokens, ms = generate(model, prompt)
        assert tokens == unpatched_tokens
        timings["unpatched"].append(ms)

    patched_ms, unpatched_ms = min(timings["patched"]), min(timings["unpatched"])
    rotary = [row for row in rope_patch.status() if row.rotary.name == "Qwen3RotaryEmbedding"]
    print(f"Qwen3RotaryEmbedding: {rotary[0].status if rotary else 'not seen'}")
    print(f"tokens identical: {patched_tokens == unpatched_tokens} ({NEW_TOKENS} greedy tokens)")
    print(f"unpatched: {unpatched_ms:.2f} ms/token")
    print(f"patched:   {patched_ms:.2f} ms/token")
    print(
        f"ratio:     {unpatched_ms / patched_ms:.2f}x (unpatched / patched; a 2-layer model spends little time in RoPE)"
    )


if __name__ == "__main__":
    main()
