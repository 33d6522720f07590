"""Supported torch / transformers versions, checked without importing them."""

from __future__ import annotations

import importlib.metadata
import re

#: package -> (lowest supported, first unsupported), as release tuples.
SUPPORTED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "torch": ((2, 4), (3,)),
    "transformers": ((4, 57), (6,)),
}


def release(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``; ``"2.13.0+cpu"`` -> ``(2, 13, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def problem() -> str | None:
    """Why rope_patch cannot patch in this environment, or None."""
    for package, (low, high) in SUPPORTED.items():
        version = installed(package)
        if version is None:
            return f"{package} is not installed"
        if not low <= release(version) < high:
            wanted = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
            return f"{package} {version} is not supported (need {wanted})"
    return None
