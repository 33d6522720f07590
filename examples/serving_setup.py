"""What to put in a serving or training script: one import before the model
is built or loaded, torch.compile after. Nothing else changes.

This demo saves a small random-weight Qwen3 to a temporary folder and loads
it back with from_pretrained, as a real script would load a checkpoint.

    python examples/serving_setup.py
"""

import tempfile

import torch
import transformers

# 1. Patch every transformers rotary embedding before the model is built or
#    loaded (before or after importing transformers: either works). Honours
#    ROPE_PATCH_DISABLE=1 (patch nothing) and ROPE_PATCH_EXCLUDE=qwen3,...
#    Modeling modules are patched as they are imported, none of them early.
import rope_patch.auto  # or: import rope_patch; rope_patch.patch(exclude=[...])


def save_demo_checkpoint(folder: str) -> None:
    """Stand-in for a downloaded checkpoint (no hub access needed)."""
    config = transformers.Qwen3Config(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def main():
    with tempfile.TemporaryDirectory() as folder:
        save_demo_checkpoint(folder)

        # 2. Load as usual (from_pretrained, meta-device init, .to(dtype) and
        #    device moves are all fine: tables are built lazily on first use,
        #    per device and dtype, and never stored in the state dict).
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    # 3. Compile after patching: the patched forward is a plain function that
    #    runs the original while dynamo traces, so fullgraph compiles as usual.
    compiled = torch.compile(model, fullgraph=True)

    input_ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        logits = model(input_ids).logits
        with rope_patch.disabled():  # the original forwards, for comparison
            reference = model(input_ids).logits
        compiled_logits = compiled(input_ids).logits
    print("rope_patch active:", rope_patch.is_patched())
    print("patched logits bit-identical to unpatched:", torch.equal(logits, reference))
    print("compiled (fullgraph) matches eager:", torch.allclose(logits, compiled_logits, atol=1e-5))


if __name__ == "__main__":
    main()
