"""``rope-patch info``: installed versions, supported ranges and the
ROPE_PATCH_* configuration, without importing torch or transformers."""

from __future__ import annotations

import os

import click

import rope_patch
from rope_patch import settings as settings_module
from rope_patch import versions
from rope_patch.cli._common import quiet

#: Packages whose versions are shown, after rope_patch itself.
PACKAGES = ("torch", "transformers", "wrapt", "click")
PREFIX = "ROPE_PATCH_"


def _range(low: tuple[int, ...], high: tuple[int, ...]) -> str:
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def version_line() -> str:
    """``rope-patch 0.2.0 (torch ..., transformers ..., wrapt ...)``, for --version."""
    found = ", ".join(f"{name} {versions.installed(name) or 'not installed'}" for name in PACKAGES[:3])
    return f"rope-patch {rope_patch.__version__} ({found})"


def report(environ=None) -> list[str]:
    """The lines ``rope-patch info`` prints.

    Args:
        environ: the environment to describe (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    lines = [f"rope-patch {rope_patch.__version__}", "", "packages:"]
    for name in PACKAGES:
        version = versions.installed(name)
        line = f"  {name:<13} {version or 'not installed':<16}"
        if name in versions.SUPPORTED:
            low, high = versions.SUPPORTED[name]
            supported = version is not None and low <= versions.release(version) < high
            line += f" supported {_range(low, high):<14} {'ok' if supported else 'NOT SUPPORTED'}"
        lines.append(line.rstrip())
    problem = versions.problem()
    lines.append("patching: " + ("available" if problem is None else f"unavailable: {problem}"))

    lines += ["", "environment:"]
    known = [
        (name, repr(env[name]) if name in env else "not set", meaning)
        for name, meaning in settings_module.VARIABLES.items()
    ]
    unknown = [
        (name, repr(env[name]), "unknown variable, ignored")
        for name in sorted(env)
        if name.startswith(PREFIX) and name not in settings_module.VARIABLES
    ]
    rows = known + unknown
    name_width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines += [f"  {name:<{name_width}}  {value:<{value_width}}  {meaning}" for name, value, meaning in rows]
    with quiet("rope_patch"):  # the problem is printed below, not logged
        parsed = settings_module.from_environment(env)
    if parsed.problem:
        lines.append(f"environment parses: no: {parsed.problem} (rope_patch.auto patches nothing)")
    else:
        lines.append("environment parses: yes" + (" (patching disabled)" if parsed.disabled else ""))
    return lines


@click.command("info")
def info_command():
    """Show versions, supported ranges and the ROPE_PATCH_* settings."""
    for line in report():
        click.echo(line)
