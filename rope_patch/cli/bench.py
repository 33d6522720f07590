"""``rope-patch bench``: per-call latency of one benchmark model's rotary
forward, unpatched vs patched vs the floor (bare table lookups).

The command chooses the module (:data:`MODELS`, one table of benchmark
configs) and leaves the measuring to
:func:`rope_patch.diagnostics.latency.measure`; it only parses options and
prints the table. Progress goes to stderr."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import click

from rope_patch.cli._common import DEVICES, DTYPES, check_device, quiet, torch_dtype

DEFAULT_SHAPES = "1x1,8x1,1x512,4x4096"


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A benchmark model: its config class (a name in ``transformers``), the
    constructor arguments (head_dim 128, as the real models), and its rotary
    class (``module:Class``). ``rope_scaling`` is written the way both
    transformers 4.57 and 5.x accept."""

    config: str
    kwargs: dict
    rotary: str


#: model type -> what ``rope-patch bench --model-type`` (and benchmarks/) build.
MODELS = {
    "qwen3": BenchModel(
        "Qwen3Config",
        {"head_dim": 128, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960},
        "transformers.models.qwen3.modeling_qwen3:Qwen3RotaryEmbedding",
    ),
    "llama3": BenchModel(
        "LlamaConfig",
        {
            "head_dim": 128,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "rope_theta": 500_000.0,
            "max_position_embeddings": 131072,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        "transformers.models.llama.modeling_llama:LlamaRotaryEmbedding",
    ),
}


def model_config(model_type: str, **overrides):
    """The config of benchmark model ``model_type``, with ``overrides``
    (layers, hidden size, vocabulary...) on top of :data:`MODELS`' arguments."""
    import transformers

    spec = MODELS[model_type]
    return getattr(transformers, spec.config)(**{**spec.kwargs, **overrides})


def rotary_class(model_type: str) -> type:
    """The rotary class of benchmark model ``model_type``."""
    module, name = MODELS[model_type].rotary.split(":")
    return getattr(importlib.import_module(module), name)


def build_rotary(model_type: str, device="cpu", **overrides):
    """A rotary module of benchmark model ``model_type`` on ``device``, in eval mode."""
    return rotary_class(model_type)(model_config(model_type, **overrides)).to(device).eval()


class Shapes(click.ParamType):
    """``BxS[,BxS...]`` -> ``((B, S), ...)`` with positive integers."""

    name = "BxS[,BxS...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        shapes = []
        for item in str(value).split(","):
            parts = item.strip().lower().split("x")
            try:
                batch, seq = (int(part) for part in parts)
            except ValueError:
                self.fail(f"{item.strip()!r} is not BATCHxSEQ (e.g. 1x512)", param, ctx)
            if batch <= 0 or seq <= 0:
                self.fail(f"{item.strip()!r}: batch and sequence length must be positive", param, ctx)
            shapes.append((batch, seq))
        return tuple(shapes)


def render(rows) -> list[str]:
    """Aligned table lines, one per measured shape."""
    table = [("SHAPE (BxS)", "UNPATCHED us", "PATCHED us", "FLOOR us", "SPEEDUP")]
    for row in rows:
        batch, seq = row.shape
        table.append(
            (
                f"{batch}x{seq}",
                f"{row.unpatched_us:.1f}",
                f"{row.patched_us:.1f}",
                "-" if row.floor_us is None else f"{row.floor_us:.1f}",
                f"{row.speedup:.2f}x",
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=False))
        )
        for line in table
    ]


@click.command("bench", short_help="Per-call latency: unpatched vs patched vs floor.")
@click.option(
    "--model-type", default="qwen3", show_default=True, help="Benchmark config: qwen3 or llama3 (head_dim 128)."
)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), help="Timed rounds per variant (default: about 1 s per shape).")
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads (default: torch's).")
@click.option(
    "--shapes",
    type=Shapes(),
    default=DEFAULT_SHAPES,
    show_default=True,
    metavar="BxS,...",
    help="Comma list of BATCHxSEQ shapes.",
)
def bench_command(model_type, device, dtype, repeats, threads, shapes):
    """Time one rotary forward per call: unpatched, patched, and the floor
    (the bare table lookups any cache must pay). Patched outputs are checked
    bit-identical first."""
    from rope_patch.diagnostics import latency

    if model_type not in MODELS:
        raise click.BadParameter(f"{model_type!r} is not one of {', '.join(MODELS)}", param_hint="--model-type")
    check_device(device)
    progress = (lambda line: click.echo(line, err=True)) if sys.stderr.isatty() else None
    with quiet("transformers"), latency.ensure_patched():
        rows = latency.measure(
            build_rotary(model_type, device),
            torch_dtype(dtype),
            shapes,
            repeats=repeats,
            threads=threads,
            label=model_type,
            progress=progress,
        )
    used = rows[0].threads if rows else threads
    click.echo(f"{model_type} rotary forward, {device} {dtype}, {used} thread(s), microseconds per call (median):")
    for line in render(rows):
        click.echo(line)
