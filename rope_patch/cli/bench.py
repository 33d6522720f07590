"""``rope-patch bench``: per-call latency of one model type's rotary forward,
unpatched vs patched vs the floor (bare table lookups), measured by
:func:`rope_patch.bench.forward_latency`. This module only parses options and
prints the table; progress goes to stderr."""

from __future__ import annotations

import sys

import click

from rope_patch.cli._common import DEVICES, DTYPES, check_device, quiet, torch_dtype

DEFAULT_SHAPES = "1x1,8x1,1x512,4x4096"


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
                f"{row.floor_us:.1f}",
                f"{row.speedup:.2f}x",
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
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
    from rope_patch import bench

    if model_type not in bench.MODEL_TYPES:
        raise click.BadParameter(
            f"{model_type!r} is not one of {', '.join(bench.MODEL_TYPES)}", param_hint="--model-type"
        )
    check_device(device)
    progress = (lambda line: click.echo(line, err=True)) if sys.stderr.isatty() else None
    with quiet("transformers"):
        rows = bench.forward_latency(
            model_type=model_type,
            device=device,
            dtype=torch_dtype(dtype),
            shapes=shapes,
            repeats=repeats,
            threads=threads,
            progress=progress,
        )
    used = rows[0].threads if rows else threads
    click.echo(f"{model_type} rotary forward, {device} {dtype}, {used} thread(s), microseconds per call (median):")
    for line in render(rows):
        click.echo(line)
