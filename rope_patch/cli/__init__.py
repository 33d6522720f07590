"""The ``rope-patch`` command line: ``list``, ``info``, ``run``, ``bench``
(also ``python -m rope_patch``).

One module per command; each imports torch and model code only when it runs,
so ``rope-patch --version``, ``info`` and ``run`` start without them.
"""

from __future__ import annotations

import click

from rope_patch.cli.bench import bench_command
from rope_patch.cli.check import check_command
from rope_patch.cli.info import info_command, version_line
from rope_patch.cli.listing import list_command
from rope_patch.cli.run import run_command


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print one line with the versions of rope-patch, torch, transformers and wrapt, and exit.",
)
def main():
    """rope_patch: every transformers rotary embedding answered from cached
    cos/sin tables, bit-identical to the unpatched forward."""


main.add_command(list_command)
main.add_command(info_command)
main.add_command(run_command)
main.add_command(bench_command)
main.add_command(check_command)

__all__ = ["main"]
