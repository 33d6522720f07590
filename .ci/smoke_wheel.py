"""Smoke test of rope-patch as users install it: from the wheel, in a clean
virtual environment holding only torch, transformers and the wheel.

.ci/run runs it with that venv's interpreter in isolated mode (``python -I``:
neither the script's folder nor the current one on sys.path) from a
temporary folder, so ``rope_patch`` can only come from the installed wheel.
Checks, each failing with a message:

- ``rope_patch`` is the installed copy (under ``sys.prefix``, no editable
  finder), its distribution carries the Apache-2.0 LICENSE;
- ``import rope_patch.auto`` patches; a greedy ``generate`` on a tiny
  random-weight Qwen3 built from a config gives the same tokens as inside
  ``rope_patch.disabled()`` and the rotary module is answered from tables
  (``rope_patch.cache_info(rotary).answered``);
- the console script: ``rope-patch list qwen3 --json`` lists
  Qwen3RotaryEmbedding as cached, ``python -m rope_patch --version`` prints
  one line, and ``rope-patch run`` activates the patch in a child program
  (its sitecustomize folder is in the wheel).

    nox -s wheel    (runs it with the wheel's venv, python -I, from a folder outside the repo)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke_wheel: FAILED: {message}")
    print(f"ok: {message}")


def command(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``args`` from the current (temporary) folder; its stdout."""
    result = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"smoke_wheel: FAILED: {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result.stdout


def check_installed_copy() -> None:
    import rope_patch

    location = os.path.realpath(rope_patch.__file__)
    prefix = os.path.realpath(sys.prefix)
    check(location.startswith(prefix + os.sep), f"rope_patch imported from the venv ({location})")
    check(not any("__editable__" in name for name in sys.modules), "no editable install finder loaded")
    distribution = importlib.metadata.distribution("rope-patch")
    check(distribution.version == rope_patch.__version__, f"distribution version {distribution.version}")
    check(distribution.metadata.get("License-Expression") == "Apache-2.0", "metadata License-Expression: Apache-2.0")
    licenses = [f for f in distribution.files or () if f.name == "LICENSE"]
    check(bool(licenses) and "Apache License" in licenses[0].read_text(), "LICENSE installed with the distribution")


def check_generate() -> None:
    import torch
    import transformers

    import rope_patch
    import rope_patch.auto

    check(rope_patch.is_patched(), "import rope_patch.auto patched")
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

    def generate():
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, prompt.shape[1] :].tolist()

    patched = generate()
    with rope_patch.disabled():
        unpatched = generate()
    check(patched == unpatched, f"patched greedy tokens identical to rope_patch.disabled() ({len(patched)} tokens)")
    info = rope_patch.cache_info(model.model.rotary_emb)
    check(info.answered, f"Qwen3RotaryEmbedding answered from tables ({len(info.tables)} table(s), {info.bytes} bytes)")


def check_commands() -> None:
    import rope_patch

    bindir = os.path.dirname(sys.executable)
    rope_patch_command = os.path.join(bindir, "rope-patch")
    check(os.access(rope_patch_command, os.X_OK), f"console script installed ({rope_patch_command})")

    rows = json.loads(command(rope_patch_command, "list", "qwen3", "--json"))
    classes = {row["class"]: row["status"] for row in rows}
    check(
        classes.get("Qwen3RotaryEmbedding") == "cached",
        f"rope-patch list qwen3 --json: Qwen3RotaryEmbedding {classes.get('Qwen3RotaryEmbedding')} ({len(rows)} rows)",
    )

    lines = command(sys.executable, "-m", "rope_patch", "--version").strip().splitlines()
    check(
        len(lines) == 1 and lines[0].startswith(f"rope-patch {rope_patch.__version__} ("),
        f"python -m rope_patch --version: {lines}",
    )

    probe = "import sys; print(sys.modules['rope_patch'].is_patched() if 'rope_patch' in sys.modules else False)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROPE_PATCH_")}
    out = command(rope_patch_command, "run", "--", sys.executable, "-c", probe, env=env).strip()
    check(out.splitlines()[-1:] == ["True"], f"rope-patch run activates the patch in the child ({out!r})")


def main() -> None:
    import torch
    import transformers

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    check_installed_copy()
    check_generate()
    check_commands()
    print("smoke_wheel: all checks passed")


if __name__ == "__main__":
    main()
