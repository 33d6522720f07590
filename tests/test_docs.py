"""Every command the README and docs/ show still runs as written: each
``rope-patch`` command line parses (command, options and choices exist, as
the installed CLI defines them), and every script a command names exists.
Commands are taken from shell blocks (lines starting with ``$ `` or
``.venv/bin/``) and inline code that starts with ``.venv/bin/``,
``rope-patch `` or ``bash ``; synopses with placeholders (``MODEL``,
``[--dtype T]``) are not commands."""

from __future__ import annotations

import pathlib
import re
import shlex

import click
import pytest

from rope_patch.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: An all-caps word or an optional part: a synopsis, not a command.
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b(?!=)|\[")
INLINE = re.compile(r"`((?:\.venv/bin/|rope-patch |bash |PYTHON=)[^`]+)`")


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for every command line the documents show."""
    found = []
    for path in DOCS:
        fenced = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if line.startswith("```"):
                fenced = not fenced
                continue
            if fenced and (
                line.startswith("$ ") or line.startswith(".venv/bin/") or line.startswith("python3 -m venv")
            ):
                found.append((where, line.removeprefix("$ ")))
            elif not fenced:
                found.extend((where, command) for command in INLINE.findall(line))
    return [(where, command) for where, command in found if not PLACEHOLDER.search(command.split("#")[0])]


def pieces(command: str) -> list[list[str]]:
    """The simple commands of a line: split at ``&&`` and ``|`` (what follows
    a pipe is a shell tool), comments and environment assignments dropped."""
    words = shlex.split(command.split("  #")[0].split(" # ")[0])
    out, current = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "|"):
            if current:
                out.append(current)
            current = [] if word == "&&" else None
        elif current is not None and (current or "=" not in word):  # not an assignment before the program
            current.append(word)
    return out


def check_rope_patch(args: list[str], where: str) -> None:
    """The arguments parse as the installed CLI defines them. A command
    named without arguments in prose (`rope-patch run`) only has to exist."""
    if not args:
        return
    if args[0].startswith("-"):
        options = {option for parameter in main.params for option in parameter.opts}
        assert set(args) <= options, f"{where}: rope-patch has no option {sorted(set(args) - options)}"
        return
    name, rest = args[0], args[1:]
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"{where}: no command {name!r}"
    command.make_context(name, list(rest), resilient_parsing=not rest)


COMMANDS = shown_commands()


def test_the_documents_show_commands():
    assert len(COMMANDS) > 20, COMMANDS
    assert any("rope-patch check" in command for _, command in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_shown_command_runs_as_written(where, command):
    for words in pieces(command):
        program, *args = words
        if program.endswith("rope-patch"):
            check_rope_patch(args, where)
        elif program.endswith(("python", "python3")) and args and args[0] not in ("-m", "-c"):
            assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
        elif program.endswith(("python", "python3")) and args[:2] == ["-m", "rope_patch"]:
            check_rope_patch(args[2:], where)
        elif program == "bash":
            assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
