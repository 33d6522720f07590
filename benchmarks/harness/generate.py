"""End-to-end greedy generation, patched against unpatched.

One model instance runs several ways in alternating runs (rotating order):
patched as installed; unpatched, each patched rotary module's class set for
the run to a subclass whose forward is the original function
(:func:`rope_patch.diagnostics.latency.unpatched_class`), so unpatched runs
pay nothing for rope_patch while the patched ones keep their tables; and
floor, a subclass whose forward only does the two lookups into rope_patch's
tables (the most any table implementation could gain). Every run's tokens
must equal the first unpatched run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable

import torch

from harness.common import as_dtype, dtype_name, model_config
from rope_patch.diagnostics.latency import (
    clock_for,
    clock_name,
    ensure_patched,
    sync_for,
    threads_scope,
    unpatched_class,
)

#: The small random-weight Qwen3 models of the CPU benchmark: name -> config
#: overrides. head_dim stays 128 (as in every Qwen3); the vocabulary is kept
#: small so that the LM head does not dwarf two decoder layers.
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
        model: the model's name (a key of the ``models`` given).
        parameters: its parameter count.
        new_tokens: tokens generated per run (per sequence).
        runs: timed runs each way (alternating).
        unpatched_tok_s, patched_tok_s, floor_tok_s: median tokens per second.
        speedup: patched / unpatched tokens per second.
        identical: every run produced the first unpatched run's tokens.
        paired_low, paired_high: 25th and 75th percentiles of the per-round
            speedups (unpatched time / patched time of the same round).
        clock: ``"thread CPU time"`` (one CPU thread) or ``"wall"``.
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


def build_model(overrides: dict, dtype=torch.float32, device="cpu", seed: int = 0, model_type: str = "qwen3"):
    """A random-weight causal LM of benchmark model ``model_type`` (vocabulary
    VOCAB unless ``overrides`` say otherwise), built on ``device``, in eval mode."""
    import transformers

    config = model_config(model_type, **{"vocab_size": VOCAB, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):  # random init where the model runs: seconds, not minutes, for 1B+ parameters
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype=as_dtype(dtype)).eval()


def _swapped(model, make_class):
    from rope_patch.forward import original_of

    @contextlib.contextmanager
    def scope():
        swapped = []
        for module in model.modules():
            cls = type(module)
            if original_of(cls.forward) is not None:
                swapped.append((module, cls))
                module.__class__ = make_class(cls)
        try:
            yield len(swapped)
        finally:
            for module, cls in swapped:
                module.__class__ = cls

    return scope()


def unpatched(model):
    """Context manager: every patched rotary module of ``model`` runs its
    class's original forward (the instance, and its tables, stay); yields
    how many modules it swapped."""
    return _swapped(model, unpatched_class)


_FLOOR_CLASSES: dict[type, type] = {}


def floor_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward only gathers from the instance's
    rope_patch tables (two ``torch.embedding`` calls)."""
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


def floor(model):
    """Context manager: the patched rotary modules of ``model`` only gather
    from their (already built) tables."""
    return _swapped(model, floor_class)


def generate(model, prompt, new_tokens: int, **kwargs):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (EOS suppressed)."""
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        **kwargs,
    )


def alternating_runs(model, prompt, new_tokens: int, runs: int, scopes: dict[str, Callable], device="cpu"):
    """Time ``generate`` in each ``name -> scope(model)`` (a context manager
    factory), ``runs`` times each in rotating order after one untimed round.

    Returns:
        (name -> seconds of each run, tokens identical to the first run's
        of the first scope in every run).
    """
    sync, clock = sync_for(device), clock_for(device)
    names = list(scopes)
    times: dict[str, list[float]] = {name: [] for name in names}
    reference, identical = None, True
    for index in range(runs + 1):  # round 0 is the warm-up
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            with scopes[name](model):
                if sync:
                    sync()
                start = clock()
                tokens = generate(model, prompt, new_tokens)
                if sync:
                    sync()
                elapsed = (clock() - start) / 1e9
            if reference is None:
                reference = tokens
            identical = identical and torch.equal(tokens, reference)
            if index:
                times[name].append(elapsed)
    assert reference.shape[1] == prompt.shape[1] + new_tokens, "generation stopped early"
    return times, identical


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
    """Tokens per second of greedy ``generate``: unpatched, patched, floor.

    Args:
        models: name -> Qwen3 config overrides (default DEFAULT_MODELS).
        new_tokens: tokens generated per run (EOS suppressed).
        runs: timed runs each way, alternating (after one warm-up each).
        batch: sequences per run (prompts of PROMPT random tokens).
        dtype, device, threads: where and how the model runs.
        progress: called with a line per model.
    """
    models = DEFAULT_MODELS if models is None else models
    device = torch.device(device)
    rows = []
    with ensure_patched(), threads_scope(threads), torch.no_grad():
        for name, overrides in models.items():
            model = build_model(overrides, dtype, device)
            generator = torch.Generator().manual_seed(1)
            prompt = torch.randint(1, VOCAB, (batch, PROMPT), generator=generator).to(device)
            with unpatched(model) as count:
                assert count, f"{name}: no patched rotary module in the model"
            generate(model, prompt, new_tokens)  # sizes the tables for every position, so the floor has them
            scopes = {"unpatched": unpatched, "patched": lambda _: contextlib.nullcontext(), "floor": floor}
            times, identical = alternating_runs(model, prompt, new_tokens, runs, scopes, device)
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
                dtype=dtype_name(dtype),
                threads=torch.get_num_threads(),
                clock=clock_name(clock_for(device)),
            )
            rows.append(row)
            if progress:
                progress(
                    f"generate {name}: {row.unpatched_tok_s:.0f} -> {row.patched_tok_s:.0f} tok/s "
                    f"({row.speedup:.3f}x, paired quartiles {row.paired_low:.3f}-{row.paired_high:.3f}; "
                    f"floor {row.floor_tok_s:.0f} tok/s; tokens identical: {row.identical})"
                )
    return rows
