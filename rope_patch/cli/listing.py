"""``rope-patch list``: every ``*RotaryEmbedding`` class of the installed
transformers, and what rope_patch does with it in this environment.

The static status of each class comes from :func:`rope_patch.status.classify`
under the ROPE_PATCH_* settings, exactly as ``import rope_patch.auto`` decides.
Whether a class classified cached is really answered from tables is left to
the runtime: the command patches in-process with the same settings and runs
:func:`rope_patch.diagnostics.verify.verify_class` on each such class (one
short call per form; every pattern with ``--verify``), which builds the same
instance the contract test builds. Nothing here re-derives eligibility.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import TYPE_CHECKING

import click

import rope_patch
from rope_patch import settings as settings_module
from rope_patch import versions
from rope_patch.cli._common import (
    DEVICES,
    DTYPES,
    Progress,
    check_device,
    model_code_contained,
    patched_like_auto,
    torch_dtype,
)
from rope_patch.status import ClassStatus, Status, classify

if TYPE_CHECKING:
    from rope_patch.discovery import RotaryClass

STATUSES = tuple(status.value for status in Status)
#: ``--verify`` results, in the CHECK column.
VERIFIED, MISMATCH, NOT_VERIFIED = "identical", "MISMATCH", "not verified"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the listing.

    Attributes:
        rotary: the class.
        status: what rope_patch does with it here.
        reason: why (or a note).
        check: with ``--verify``, for cached classes: VERIFIED, MISMATCH or NOT_VERIFIED.
    """

    rotary: RotaryClass
    status: Status
    reason: str
    check: str | None = None

    @classmethod
    def of(cls, decision: ClassStatus) -> Row:
        return cls(decision.rotary, decision.status, decision.reason)

    def as_dict(self) -> dict[str, str]:
        """The ``--json`` row."""
        row = {
            "model_type": self.rotary.model_type,
            "module": self.rotary.module,
            "class": self.rotary.name,
            "status": str(self.status),
            "reason": self.reason,
        }
        if self.check is not None:
            row["check"] = self.check
        return row


def _observe(row: Row, device: str, dtype: str | None) -> tuple[Row, bool]:
    """Let the runtime decide between cached and fallback for a class
    classified cached: verify_class with probe calls, or every case with
    ``dtype`` (``--verify``). Returns the row and whether it failed to verify."""
    from rope_patch.diagnostics.verify import verify_class

    if not rope_patch.is_patched():  # patch() declined: unsupported torch/transformers
        why = f"nothing is patched: {versions.problem() or 'patching is off'}"
        return dataclasses.replace(row, status=Status.EXCLUDED, reason=why), False
    if dtype is None:
        result = verify_class(row.rotary, device, cases="probe")
        return Row(row.rotary, result.status, result.reason), False
    where = f"{device} {dtype}"
    try:
        result = verify_class(row.rotary, device, (torch_dtype(dtype),), cases="all")
    except Exception as error:  # noqa: BLE001 - reported as this class's failure
        return dataclasses.replace(row, check=NOT_VERIFIED, reason=f"{type(error).__name__}: {error}"), True
    if result.problems:
        return Row(row.rotary, result.status, f"on {where}: " + "; ".join(result.problems), MISMATCH), True
    if result.status is not Status.CACHED:
        return Row(row.rotary, result.status, f"on {where}: {result.reason}"), not result.built
    note = f"; {result.reason}" if result.reason else ""
    return Row(row.rotary, result.status, f"identical to unpatched on {where}{note}", VERIFIED), False


def collect(pattern: str | None, wanted: Status | None, progress: Progress, device="cpu", dtype=None):
    """The rows to show.

    Args:
        pattern: model type or class name, exact or a glob (only matching
            modules are imported).
        wanted: keep only rows with this status (None: all).
        progress: called while importing and probing.
        device, dtype: ``--verify``'s (dtype None: no verification).

    Returns:
        ``(rows, import_failures, unverified)``: rows in module order, the
        modules that could not be imported, and how many cached classes
        were not proven identical.
    """
    from rope_patch.diagnostics.scan import scan_catalog

    environment = settings_module.from_environment()
    scanned = scan_catalog(lambda i, total, name: progress(i, total, f"importing {name}"), pattern)
    rows = [Row.of(classify(rotary, environment)) for rotary in scanned.rotaries]
    unverified = 0
    if wanted in (Status.CACHED, Status.FALLBACK, None):
        for i, row in enumerate(rows):
            if row.status is Status.CACHED:
                progress(i + 1, len(rows), f"{'verifying' if dtype else 'probing'} {row.rotary.name}")
                rows[i], failed = _observe(row, device, dtype)
                unverified += failed
    rows = [row for row in rows if wanted is None or row.status is wanted]
    return rows, scanned.failures, unverified


def summary(rows, failures=()) -> str:
    """``N classes: a cached, b fallback, c excluded, d unsupported``, and
    the modules not imported for a missing optional package."""
    counts = dict.fromkeys(Status, 0)
    for row in rows:
        counts[row.status] += 1
    line = f"{len(rows)} {'class' if len(rows) == 1 else 'classes'}: " + ", ".join(
        f"{counts[status]} {status}" for status in Status
    )
    missing = sorted({failure.missing_package for failure in failures if failure.missing_package})
    skipped = sum(1 for failure in failures if failure.missing_package)
    if skipped:
        line += f" ({skipped} module{'s' if skipped > 1 else ''} not imported: needs {', '.join(missing)})"
    return line


def render(rows) -> list[str]:
    """Aligned table lines: model type, class, status, [check,] reason."""
    checked = any(row.check is not None for row in rows)
    header = ("MODEL TYPE", "CLASS", "STATUS", *(("CHECK",) if checked else ()), "REASON")
    table = [header]
    for row in rows:
        check = ((row.check or ""),) if checked else ()
        table.append((row.rotary.model_type, row.rotary.name, str(row.status), *check, row.reason))
    widths = [max(len(line[column]) for line in table) for column in range(len(header) - 1)]
    widths.append(0)  # the last column is not padded
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]


@click.command("list", short_help="Every rotary class and what rope_patch does with it.")
@click.argument("pattern", required=False)
@click.option(
    "--status",
    "wanted",
    type=click.Choice(STATUSES, case_sensitive=False),
    help="Only classes with this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON list of rows on stdout.")
@click.option("--verify", is_flag=True, help="Prove every cached class bit-identical to its unpatched forward.")
@click.option("--device", type=click.Choice(DEVICES), help="With --verify: where to run (default cpu).")
@click.option("--dtype", type=click.Choice(DTYPES), help="With --verify: activation dtype (default float32).")
def list_command(pattern, wanted, as_json, verify, device, dtype):
    """List every *RotaryEmbedding class of the installed transformers with
    what rope_patch does with it here: cached, fallback (patched, but the
    runtime computes it unpatched), excluded or unsupported.

    PATTERN is a model type or class name, case-insensitive: an exact name
    (qwen3, Qwen3RotaryEmbedding) or a glob ('qwen3*', '*VisionRotaryEmbedding'),
    matched as ROPE_PATCH_EXCLUDE matches. Only the matching modeling modules
    are imported; without PATTERN all of them are (seconds).
    ROPE_PATCH_DISABLE and ROPE_PATCH_EXCLUDE are honoured as
    `import rope_patch.auto` honours them.
    """
    if not verify and (device or dtype):
        raise click.UsageError("--device and --dtype only apply with --verify")
    device = check_device(device or "cpu")
    dtype = (dtype or "float32") if verify else None
    wanted = Status(wanted.lower()) if wanted else None
    progress = Progress()
    try:
        with model_code_contained(), patched_like_auto():
            rows, failures, unverified = collect(pattern, wanted, progress, device, dtype)
    finally:
        progress.clear()
    for failure in failures:
        if not failure.missing_package:
            click.echo(f"note: {failure.module} not imported, its classes are not listed: {failure.reason}", err=True)
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        for line in render(rows):
            click.echo(line)
        if verify:
            click.echo(f"verified on {device} {dtype}: {unverified} cached classes not proven identical")
        click.echo(summary(rows, failures))
    if not rows:
        what = f"matches {pattern!r}" if pattern else "was found"
        hint = " (model types and class names, exact or a glob such as 'qwen*'; see `rope-patch list`)"
        click.echo(
            f"rope-patch list: no rotary class {what}{' with status ' + str(wanted) if wanted else ''}"
            f"{hint if pattern else ''}",
            err=True,
        )
        sys.exit(1)
    if unverified:
        sys.exit(1)
