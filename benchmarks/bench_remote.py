"""Remote code (``trust_remote_code=True``, issue #21): what answering a
cache rebuild from tables gains, and what sharing per-layer tables saves.

1. **Rebuild per decode step** (DeepSeek-V3-shaped: YaRN, factor 40,
   original maximum 4096, rope head_dim 64, bf16). DeepSeek-V3's remote
   rotary leaves ``max_seq_len_cached = None`` after ``__init__``, so its
   forward rebuilds ``cos_cached``/``sin_cached`` for the whole sequence at
   every new length: once per layer per decode step. Timed: one rotary
   call as the attention makes it at sequence length ``n`` with the
   rebuild taken (``max_seq_len_cached`` reset before each call, as every
   decode step finds it: one position short), unpatched (the original) and
   patched (the rebuild replayed from the table), in alternating blocks on
   one thread (thread CPU time, medians).
2. **Decode steps of a model**: a DeepSeek-V3-shaped tiny model (8 layers,
   one rotary each, hidden 128 with 2 heads of 64), a 512-token prompt then
   32 decode steps with a KV cache, unpatched and patched twins in
   alternating runs; milliseconds per step.
3. **Memory of per-layer rotaries**: 32 InternLM2.5-style rotaries
   (``forward(x, position_ids)``, head_dim 128), one per layer, each called
   on 4096 positions in bf16 as its attention calls it; the sum of
   ``rope_patch.cache_info(...).bytes`` (shared columns count 1/k in each of
   the k modules sharing them) with and without sharing; the same for the
   DeepSeek-V3-shaped rebuild tables of 32 layers.
4. **A call within the module's own cache** (InternLM2's remote rotaries,
   InternVL2-style, whose ``__init__`` builds the cache for
   ``max_position_embeddings``): ``forward(x, seq_len=n)`` below it slices
   ``cos_cached``: nothing to gain, and it must cost what it costs
   unpatched (the "never slower" check for these classes, which the
   catalogue benchmark cannot build: they are remote code).

The models come from tests/remote_models.py (the folders the tests write),
loaded as remote code from a temporary folder, offline.

    python benchmarks/bench_remote.py [--rounds 21] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
_MODULES = tempfile.mkdtemp(prefix="rope_patch_bench_remote_")
os.environ.setdefault("HF_MODULES_CACHE", _MODULES)  # before transformers is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rope_patch  # noqa: E402
from rope_patch.cache import shared  # noqa: E402
from rope_patch.diagnostics import latency  # noqa: E402
from rope_patch.diagnostics.verify import module_state  # noqa: E402
from rope_patch.identity import difference  # noqa: E402
from tests.remote_models import write_model_folder  # noqa: E402

#: DeepSeek-V3's rotary: qk_rope_head_dim 64, YaRN factor 40 from 4096.
DEEPSEEK = {
    "rotary": "yarn",
    "rotary_factor": 40.0,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "max_position_embeddings": 163840,
    "rope_theta": 10000.0,
}


def load(style: str, **config):
    """The remote model class's model, built from a written folder's config."""
    import transformers

    folder = write_model_folder(pathlib.Path(tempfile.mkdtemp(prefix="rope_patch_model_")) / style, style, **config)
    loaded = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(loaded, trust_remote_code=True).eval()


def versus_twin(call, rotary, twin, rounds: int) -> tuple[float, float]:
    """Median microseconds of ``call(twin)`` unpatched and ``call(rotary)``
    patched, in alternating blocks on one thread, once the patched call's
    output and the module's whole state after it are checked to be the
    unpatched ones."""
    with torch.no_grad():
        call(rotary)  # builds and verifies the table
        with rope_patch.disabled():
            expected = call(twin)
        assert difference(expected, call(rotary)) is None
        assert module_state(rotary) == module_state(twin)
        times = latency.alternate(
            {"unpatched": (call, (twin,)), "patched": (call, (rotary,))},
            "cpu",
            rounds=rounds,
            contexts={"unpatched": rope_patch.disabled},
        )
    return statistics.median(times["unpatched"]), statistics.median(times["patched"])


def rebuild_per_step(rounds: int, lengths) -> None:
    print("\n1. One rotary call with its rebuild (DeepSeek-V3 YaRN, head_dim 64, bf16), microseconds (median)")
    print("   seq_len  unpatched  patched  speedup")
    model = load("deepseek", num_hidden_layers=1, **DEEPSEEK).to(torch.bfloat16)
    rotary = model.layers[0].rotary_emb
    twin = copy.deepcopy(rotary)
    forward = type(rotary).forward
    for n in lengths:
        x = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16)

        def step(module, n=n, x=x):
            module.max_seq_len_cached = n - 1  # every decode step finds the cache one position short
            return forward(module, x, seq_len=n)

        unpatched, patched = versus_twin(step, rotary, twin, rounds)
        print(f"   {n:7d}  {unpatched:9.1f}  {patched:7.1f}  {unpatched / patched:6.2f}x")


def decode_steps(runs: int, prompt: int, steps: int, layers: int) -> None:
    print(
        f"\n2. Decode with a KV cache, DeepSeek-V3-shaped tiny model ({layers} layers, one rotary each, bf16): "
        f"{prompt}-token prompt, {steps} steps, ms per step (median of {runs} runs)"
    )
    base = load("deepseek", num_hidden_layers=layers, **DEEPSEEK).to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, prompt), generator=torch.Generator().manual_seed(0))
    clock = time.thread_time_ns

    def run(model):
        with torch.no_grad():
            out = model(ids)
            pasts, token = out.layer_pasts, out.logits[:, -1:].argmax(-1)
            out = model(token, layer_pasts=pasts)  # the first step builds the tables: not timed
            pasts, token = out.layer_pasts, out.logits[:, -1:].argmax(-1)
            start, tokens = clock(), []
            for _ in range(steps):
                out = model(token, layer_pasts=pasts)
                pasts, token = out.layer_pasts, out.logits[:, -1:].argmax(-1)
                tokens.append(int(token))
        return (clock() - start) / steps / 1e6, tokens

    per_step = {"unpatched": [], "patched": []}
    for _ in range(runs):
        for name in ("unpatched", "patched"):
            model = copy.deepcopy(base)
            if name == "unpatched":
                with rope_patch.disabled():
                    ms, tokens = run(model)
                reference = tokens
            else:
                ms, tokens = run(model)
                assert tokens == reference, "patched decode differs from unpatched"
            per_step[name].append(ms)
    unpatched, patched = (statistics.median(per_step[name]) for name in ("unpatched", "patched"))
    print(f"   unpatched {unpatched:.3f} ms/step, patched {patched:.3f} ms/step: {unpatched / patched:.2f}x")


def memory(layers: int, positions: int) -> None:
    print(f"\n3. Table memory, {layers} per-layer rotaries, {positions} positions, bf16 (sum of cache_info bytes)")
    adopt = shared.adopt
    for style, config, call in (
        ("internlm25", {"rotary": "default", "hidden_size": 256, "num_attention_heads": 2}, "positions"),
        ("deepseek", DEEPSEEK, "seq_len"),
    ):
        for sharing in (False, True):
            model = load(style, num_hidden_layers=layers, **{**config, "max_position_embeddings": 2 * positions})
            model = model.to(torch.bfloat16)
            rotaries = [layer.rotary_emb for layer in model.layers]
            shared.adopt = adopt if sharing else (lambda *args, **kwargs: None)
            try:
                x = torch.zeros(1, 2, positions, rotaries[0].dim, dtype=torch.bfloat16)
                with torch.no_grad():
                    for rotary in rotaries:
                        if call == "positions":
                            rotary(x, torch.arange(positions)[None])
                        else:
                            rotary(x, seq_len=positions)
            finally:
                shared.adopt = adopt
            infos = [rope_patch.cache_info(rotary) for rotary in rotaries]
            total = sum(info.bytes for info in infos)
            shared_by = {table.shared_by for info in infos for table in info.tables}
            label = f"{style} ({'forward' if call == 'positions' else 'cache rebuild'})"
            print(
                f"   {label:34} {'shared' if sharing else 'one table per layer':20} {total / 2**20:8.2f} MiB "
                f"(tables shared by {sorted(shared_by)})"
            )
            del model, rotaries, infos
            shared.forget()


def own_cache(rounds: int, seq_len: int) -> None:
    print(
        f"\n4. A call within the module's own cache (InternLM2 remote rotaries, seq_len={seq_len}, bf16), microseconds"
    )
    print("   class                                     unpatched  patched  patched/unpatched")
    model = load("internvl", rotary=["default", "dynamic"], num_hidden_layers=2, max_position_embeddings=4096)
    for rotary in {
        type(m).__name__: m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")
    }.values():
        x = torch.zeros(1, 2, 1, rotary.dim, dtype=torch.bfloat16)
        twin = copy.deepcopy(rotary)

        def call(module, x=x):
            return module(x, seq_len=seq_len)

        unpatched, patched = versus_twin(call, rotary, twin, rounds)
        print(f"   {type(rotary).__name__:40}  {unpatched:9.2f}  {patched:7.2f}  {patched / unpatched:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke run)")
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(1)
    assert rope_patch.patch()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, one thread, thread CPU time")
    if args.quick:
        rebuild_per_step(3, (64,))
        decode_steps(1, 16, 4, 2)
        memory(2, 64)
        own_cache(3, 100)
    else:
        rebuild_per_step(args.rounds, (512, 2048, 4096))
        decode_steps(5, 512, 32, 8)
        memory(32, 4096)
        own_cache(args.rounds, 100)


if __name__ == "__main__":
    main()
