"""The package's faces between modules (docs/design.md, "Layers"): a name one
module of rope_patch takes from another is public there. The layers
themselves (which module may import which) are import-linter contracts in
pyproject.toml, checked by ``lint-imports`` in CI's lint step; ruff's
PLC2701 does not look inside one package, hence this test.

Read from the source alone: ``from rope_patch.x import _name`` and
``x._name`` where ``x`` names another rope_patch module (imported by
``from``, ``import ... as`` or a plain dotted ``import rope_patch.x``) are
refused (dunders are not private names). Relative imports, which this
check would not resolve, are refused by ruff (TID252)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rope_patch"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def private_names_taken(name: str, tree: ast.Module, known: set[str]) -> list[str]:
    """Each private name ``name`` takes from another rope_patch module."""
    taken, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rope_patch"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:  # a module
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif private(alias.name) and node.module != name:
                    taken.append(f"{name} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and dotted(node.value) in aliases:
            target = aliases[dotted(node.value)]
            if target != name and private(node.attr):
                taken.append(f"{name} uses {target}.{node.attr}")
    return taken


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def test_modules_take_only_public_names_from_each_other():
    found = modules()
    assert "rope_patch.cache.engine" in found, sorted(found)  # the walk found the package
    taken = [line for name, tree in found.items() for line in private_names_taken(name, tree, set(found))]
    assert taken == []


def test_the_check_sees_a_private_name(tmp_path):
    """The check itself: each way of taking a private name is seen."""
    tree = ast.parse(
        "from rope_patch.cache.rule import _is_tracing\n"
        "from rope_patch.cache import watch\n"
        "watch._MISSING\n"
        "watch.__name__\n"
        "import rope_patch.cache.bounds\n"
        "rope_patch.cache.bounds._last\n"
    )
    known = {"rope_patch.cache", "rope_patch.cache.rule", "rope_patch.cache.watch", "rope_patch.cache.bounds"}
    assert sorted(private_names_taken("rope_patch.cache.fast", tree, known)) == [
        "rope_patch.cache.fast imports rope_patch.cache.rule._is_tracing",
        "rope_patch.cache.fast uses rope_patch.cache.bounds._last",
        "rope_patch.cache.fast uses rope_patch.cache.watch._MISSING",
    ]
