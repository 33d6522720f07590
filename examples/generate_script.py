"""An ordinary generation script: it does not import rope_patch.

Run it as is, then under ``rope-patch run`` (see run_any_script.sh), and
compare the first line it prints (from the repository root, after the
README's set-up):

    .venv/bin/python examples/generate_script.py
    .venv/bin/rope-patch run -- .venv/bin/python examples/generate_script.py
"""

import sys

import torch
import transformers
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding


def rotary_patched() -> bool:
    """Whether rope_patch (loaded by `rope-patch run`, not by this script)
    caches Qwen3RotaryEmbedding in this process."""
    rope_patch = sys.modules.get("rope_patch")
    if rope_patch is None:
        return False
    return any(row.rotary.cls is Qwen3RotaryEmbedding and row.status == "cached" for row in rope_patch.status())


def main():
    config = transformers.Qwen3Config(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.arange(1, 9)[None]
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0
        )
    print(f"Qwen3RotaryEmbedding patched by rope_patch: {rotary_patched()}")
    print(f"generated: {out[0, prompt.shape[1] :].tolist()}")


if __name__ == "__main__":
    main()
