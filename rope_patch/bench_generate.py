"""End-to-end greedy generation, patched against unpatched.

The same model instance runs three ways in alternating runs: patched as
installed; unpatched, with each rotary module's class set for the run to a
subclass whose forward is the original function
(:func:`rope_patch.bench.unpatched_class`), so the unpatched runs pay nothing
for rope_patch and the patched runs keep their tables between runs; and
floor, a subclass whose forward is only the two lookups into rope_patch's
tables (the most any table implementation could gain). The generated tokens
must be identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable

import torch

from rope_patch import bench

#: The issue's small random-weight Qwen3 models: name -> config overrides.
#: head_dim stays 128 (as in every Qwen3); the vocabulary is kept small so
#: that the LM head does not dwarf two decoder layers.
DEFAULT_MODELS = {
    "qwen3 2 layers, hidden 128": {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "qwen3 4 layers, hidden 512": {
        "num_hidden_layers": 4,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}
VOCAB = 4096
PROMPT = 16


@dataclasses.dataclass
class GenerateRow:
    """Greedy generation throughput of one model.

    Attributes:
        model: the model's name (a key of DEFAULT_MODELS).
        parameters: its parameter count.
        new_tokens: tokens generated per run (per sequence).
        runs: timed runs each way (alternating).
        unpatched_tok_s, patched_tok_s: median tokens per second.
        speedup: patched / unpatched tokens per second.
        identical: patched, unpatched and floor runs produced the same tokens.
        clock: ``"thread CPU time"`` (one CPU thread) or ``"wall"``
            (:func:`rope_patch.bench.clock_for`).
        floor_tok_s: median tokens per second with the bare-lookup rotary.
        paired_low, paired_high: 25th and 75th percentiles of the per-round
            speedups (unpatched time / patched time of the same round): the
            spread to read ``speedup`` against.
    """

    model: str
    parameters: int
    new_tokens: int
    runs: int
    unpatched_tok_s: float
    patched_tok_s: float
    speedup: float
    identical: bool
    floor_tok_s: float | None = None
    paired_low: float | None = None
    paired_high: float | None = None
    dtype: str = "fp32"
    threads: int = 0
    clock: str = "wall"


def build_model(overrides: dict, dtype=torch.float32, device="cpu", seed: int = 0):
    """A random-weight Qwen3ForCausalLM from ``rotary_config("qwen3")`` with
    ``overrides``, in eval mode."""
    import transformers

    config = bench.rotary_config("qwen3", vocab_size=VOCAB, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=bench.as_dtype(dtype)).eval()


@contextlib.contextmanager
def unpatched(model):
    """Within the block, every patched rotary module of ``model`` runs its
    class's original forward (the instance, and its tables, stay)."""
    from rope_patch.forward import original_of

    swapped = []
    for module in model.modules():
        cls = type(module)
        if original_of(cls.forward) is not None:
            swapped.append((module, cls))
            module.__class__ = bench.unpatched_class(cls)
    try:
        yield len(swapped)
    finally:
        for module, cls in swapped:
            module.__class__ = cls


_FLOOR_CLASSES: dict[type, type] = {}


def floor_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward only gathers from the instance's
    rope_patch tables (two ``torch.embedding`` calls): a zero-overhead table
    implementation, for the ceiling of what caching can gain."""
    if cls not in _FLOOR_CLASSES:
        from rope_patch import cache

        embedding = torch.embedding
        columns: dict[int, tuple] = {}

        def forward(self, x, position_ids):
            pair = columns.get(id(self))
            if pair is None:
                pair = columns[id(self)] = cache.state_of(self).tables[(x.device, x.dtype, None)].columns
            return embedding(pair[0], position_ids), embedding(pair[1], position_ids)

        _FLOOR_CLASSES[cls] = type(f"Floor{cls.__name__}", (cls,), {"forward": forward})
    return _FLOOR_CLASSES[cls]


@contextlib.contextmanager
def floor(model):
    """Within the block, the patched rotary modules of ``model`` only gather
    from their (already built) tables."""
    from rope_patch.forward import original_of

    swapped = []
    for module in model.modules():
        cls = type(module)
        if original_of(cls.forward) is not None:
            swapped.append((module, cls))
            module.__class__ = floor_class(cls)
    try:
        yield len(swapped)
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _generate(model, prompt, new_tokens):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )


def generate_throughput(
    models: dict[str, dict] | None = None,
    new_tokens: int = 64,
    runs: int = 10,
    batch: int = 1,
    dtype=torch.float32,
    device="cpu",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[GenerateRow]:
    """Tokens per second of greedy ``generate``, patched vs unpatched.

    Args:
        models: name -> Qwen3 config overrides (default DEFAULT_MODELS).
        new_tokens: tokens to generate per run (EOS suppressed).
        runs: timed runs each way, alternating (after one warm-up each).
        batch: sequences per run (prompts of PROMPT random tokens).
        dtype, device, threads: where and how the model runs.
        progress: called with a line per model.

    Returns:
        One GenerateRow per model.

    Raises:
        AssertionError: no rotary module is patched in the model.
    """
    models = DEFAULT_MODELS if models is None else models
    device = torch.device(device)
    sync = bench._sync_of(device)
    rows = []
    with bench.patch_active(), bench.threads_scope(threads), torch.no_grad():
        for name, overrides in models.items():
            model = build_model(overrides, dtype, device)
            clock = bench.clock_for(device)
            generator = torch.Generator().manual_seed(1)
            prompt = torch.randint(1, VOCAB, (batch, PROMPT), generator=generator).to(device)
            with unpatched(model) as count:
                assert count, f"{name}: no patched rotary module in the model"
                reference = _generate(model, prompt, new_tokens)
            identical = torch.equal(_generate(model, prompt, new_tokens), reference)  # builds the tables
            scopes = {"unpatched": unpatched, "patched": lambda _: contextlib.nullcontext(), "floor": floor}
            modes = list(scopes)
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            for index in range(runs + 1):  # run 0 of each is the warm-up
                shift = index % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    with scopes[mode](model):
                        if sync:
                            sync()
                        start = clock()
                        tokens = _generate(model, prompt, new_tokens)
                        if sync:
                            sync()
                        elapsed = (clock() - start) / 1e9
                    identical = identical and torch.equal(tokens, reference)
                    if index:
                        times[mode].append(elapsed)
            assert reference.shape[1] == PROMPT + new_tokens, "generation stopped early"
            per_s = {mode: batch * new_tokens / statistics.median(values) for mode, values in times.items()}
            paired = sorted(u / p for u, p in zip(times["unpatched"], times["patched"]))
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            row = GenerateRow(
                model=name,
                parameters=sum(p.numel() for p in model.parameters()),
                new_tokens=new_tokens,
                runs=runs,
                unpatched_tok_s=per_s["unpatched"],
                patched_tok_s=per_s["patched"],
                speedup=per_s["patched"] / per_s["unpatched"],
                identical=identical,
                floor_tok_s=per_s["floor"],
                paired_low=quartiles[0],
                paired_high=quartiles[2],
                dtype=bench.dtype_name(dtype),
                threads=torch.get_num_threads(),
                clock=bench.clock_name(clock),
            )
            rows.append(row)
            if progress:
                progress(
                    f"generate {name}: {row.unpatched_tok_s:.0f} -> {row.patched_tok_s:.0f} tok/s "
                    f"({row.speedup:.3f}x, paired quartiles {row.paired_low:.3f}-{row.paired_high:.3f}; floor {row.floor_tok_s:.0f} tok/s; tokens identical: {row.identical})"
                )
    return rows
