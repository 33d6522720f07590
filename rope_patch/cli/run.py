"""``rope-patch run -- PROGRAM [ARGS...]``: run an unmodified program with
rope_patch active, the way ``ddtrace-run`` and ``opentelemetry-instrument`` do.

The directory holding rope_patch's ``sitecustomize.py`` goes first on
PYTHONPATH, so every Python interpreter the program starts (itself, workers,
subprocesses) imports ``rope_patch.auto`` at start-up and then the program's
own ``sitecustomize``, if it has one. The command then execs PROGRAM, so its
exit status and signals are the program's own.
"""

from __future__ import annotations

import os

import click

from rope_patch import settings as settings_module

#: The folder that ``rope-patch run`` puts first on PYTHONPATH.
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_sitecustomize")


def child_environment(environ, exclude: tuple[str, ...]) -> dict[str, str]:
    """The environment PROGRAM runs with.

    Args:
        environ: the current environment.
        exclude: ``--exclude`` values (comma lists), already validated.

    Returns:
        A copy of ``environ`` with BOOTSTRAP_DIR in front of the user's
        PYTHONPATH (kept verbatim after it) and ``exclude`` appended to
        ROPE_PATCH_EXCLUDE.
    """
    env = dict(environ)
    user_path = env.get("PYTHONPATH", "")
    if user_path.split(os.pathsep)[0] != BOOTSTRAP_DIR:  # a nested `rope-patch run` adds nothing
        env["PYTHONPATH"] = BOOTSTRAP_DIR + (os.pathsep + user_path if user_path else "")
    names = [value for value in (env.get(settings_module.EXCLUDE, ""), *exclude) if value.strip()]
    if exclude:
        env[settings_module.EXCLUDE] = ",".join(names)
    return env


def _check_exclude(ctx, param, values):
    for value in values:
        try:
            settings_module.parse_names("--exclude", value)
        except settings_module.SettingsError as error:
            raise click.BadParameter(str(error)) from None
    return values


@click.command(
    "run",
    short_help="Run a program with rope_patch active (like ddtrace-run).",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="NAMES",
    callback=_check_exclude,
    help="Model types or class names to leave unpatched (comma list; repeatable); "
    "added to ROPE_PATCH_EXCLUDE for the program.",
)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(exclude, program, args):
    """Run PROGRAM with every rotary embedding patched, e.g.

    \b
        rope-patch run -- python generate.py --max-new-tokens 64

    Works for any Python started with site enabled and PYTHONPATH honoured
    (not `python -S`, `-E` or `-I`).
    """
    env = child_environment(os.environ, exclude)
    try:
        os.execvpe(program, [program, *args], env)
    except FileNotFoundError:
        click.echo(f"rope-patch run: {program}: command not found", err=True)
        raise SystemExit(127) from None
    except OSError as error:  # not executable, a directory, ...
        click.echo(f"rope-patch run: {program}: {error.strerror or error}", err=True)
        raise SystemExit(126) from None
