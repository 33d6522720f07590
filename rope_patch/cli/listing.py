"""``rope-patch list``: every ``*RotaryEmbedding`` class of the installed
transformers, and what rope_patch does with it in this environment.

The static status of each class comes from :func:`rope_patch.patching.classify`
under the ROPE_PATCH_* settings, exactly as ``import rope_patch.auto`` decides.
Whether a class classified cached is really answered from tables is left to
the runtime: the command patches in-process with the same settings, builds each
such class from its model's default config and runs one small forward; if the
runtime gave up on it (its own verification failed, the forward is not
position-elementwise, ...), the row says fallback with the runtime's reason.
Nothing here re-derives eligibility.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import sys
import warnings

import click

import rope_patch
from rope_patch import patching, versions
from rope_patch import settings as settings_module
from rope_patch.cli._common import DEVICES, DTYPES, Progress, check_device, quiet, torch_dtype

STATUSES = (patching.CACHED, patching.FALLBACK, patching.EXCLUDED, patching.UNSUPPORTED)
#: Statuses ``--verify`` gives the classes it checks.
VERIFIED = f"{patching.CACHED}, verified"
MISMATCH = f"{patching.CACHED}, mismatch"
NOT_VERIFIED = f"{patching.CACHED}, not verified"

_GLOB_CHARACTERS = "*?["


def matches(pattern: str | None, rotary) -> bool:
    """Whether ``rotary``'s model type or class name matches ``pattern``:
    a case-insensitive fnmatch glob when it has ``*?[``, else a substring."""
    if not pattern:
        return True
    wanted = pattern.lower()
    fields = (rotary.model_type.lower(), rotary.name.lower())
    if any(character in wanted for character in _GLOB_CHARACTERS):
        return any(fnmatch.fnmatchcase(field, wanted) for field in fields)
    return any(wanted in field for field in fields)


@contextlib.contextmanager
def _patched_like_auto():
    """Patching as ``import rope_patch.auto`` does it (environment settings),
    undone afterwards; an existing patch (``rope-patch run -- rope-patch
    list``) is used as it is."""
    ours = not rope_patch.is_patched() and rope_patch.patch()
    try:
        yield
    finally:
        if ours:
            rope_patch.unpatch()


@contextlib.contextmanager
def _model_code_contained():
    """Keep model code's chatter off stdout and the terminal.

    Importing modeling modules can ``print`` (transformers' auto_docstring
    reports missing configs on stdout), which would corrupt ``--json``;
    default configs log validation warnings; the runtime logs each fallback,
    which the rows already report.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger()  # configures its level now, so quiet() is not overridden on first use
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), quiet("transformers", "rope_patch"):
        warnings.simplefilter("ignore")
        yield


def _observe(row: patching.ClassStatus) -> patching.ClassStatus:
    """Let the runtime decide between cached and fallback for a class
    classified cached: build it, call it once per layer type, read its state."""
    import torch

    from rope_patch import catalog, mrope, tables

    if not rope_patch.is_patched():  # patch() declined: unsupported torch/transformers
        return dataclasses.replace(
            row, status=patching.EXCLUDED, reason=f"nothing is patched: {versions.problem() or 'patching is off'}"
        )
    try:
        instance = catalog.default_instance(row.rotary, "cpu")
    except catalog.InstantiationError as error:
        return dataclasses.replace(row, reason=f"not instantiated: {error}")
    x, positions = catalog.probe_inputs()
    raised = None
    for layer_type in catalog.layer_types_of(instance):
        extra = () if layer_type is None else (layer_type,)
        for probe in (positions, positions.expand(catalog.MROPE_AXES, *positions.shape)):
            try:
                with torch.no_grad():
                    instance(x, probe, *extra)
            except Exception as error:  # noqa: BLE001 - the unpatched forward's own error (the patched one raises alike)
                if probe is positions:
                    raised = raised or f"{type(error).__name__}: {error}"
    state = tables.state_of(instance)
    if state is not None and state.fallback is not None:
        return dataclasses.replace(row, status=patching.FALLBACK, reason=state.fallback)
    built = state is not None and any(table is not None for table in state.tables.values())
    if built:
        if mrope.recombines(instance) or (raised is not None and catalog.MROPE_AXES in mrope.answered_axes(instance)):
            return dataclasses.replace(row, reason="M-RoPE: 3-D position_ids are answered from the tables too")
        return row
    if raised is not None:
        # The forward rejects these inputs (e.g. it needs 3-D multimodal
        # position ids): the runtime decided nothing, so the static status stands.
        return dataclasses.replace(row, reason=f"not probed: the forward raised {raised}")
    return dataclasses.replace(
        row, status=patching.FALLBACK, reason="the runtime built no table for the default config (computed unpatched)"
    )


def collect(pattern: str | None, wanted: str | None, progress: Progress):
    """The rows to show.

    Args:
        pattern: see :func:`matches`.
        wanted: keep only rows with this status (None: all).
        progress: called while importing and probing.

    Returns:
        ``(rows, import_failures)``: ClassStatus rows in module order, and the
        catalog's modules that could not be imported.
    """
    from rope_patch import catalog

    environment = settings_module.from_environment()
    scanned = catalog.scan_catalog(lambda i, total, name: progress(i, total, f"importing {name}"))
    rows = [patching.classify(rotary, environment) for rotary in scanned.rotaries if matches(pattern, rotary)]
    if wanted in (patching.CACHED, patching.FALLBACK, None):
        for i, row in enumerate(rows):
            if row.status == patching.CACHED:
                progress(i + 1, len(rows), f"probing {row.rotary.name}")
                rows[i] = _observe(row)
    rows = [row for row in rows if wanted is None or row.status == wanted]
    return rows, scanned.failures


def verify_rows(rows, device: str, dtype: str, progress: Progress):
    """Run :func:`rope_patch.verify.verify_module` for every cached row.

    Returns:
        ``(rows, failures)``: rows with VERIFIED, MISMATCH or NOT_VERIFIED (or
        FALLBACK when the runtime does not cache the class on this device and
        dtype), and how many cached classes were not proven identical.
    """
    from rope_patch import catalog
    from rope_patch.verify import verify_module

    where = f"{device} {dtype}"
    out, failures = [], 0
    for i, row in enumerate(rows):
        if row.status != patching.CACHED:
            out.append(row)
            continue
        progress(i + 1, len(rows), f"verifying {row.rotary.name}")
        try:
            instance = catalog.default_instance(row.rotary, device)
            verdict = verify_module(instance, catalog.layer_types_of(instance), device, torch_dtype(dtype))
        except Exception as error:  # noqa: BLE001 - reported as this class's failure
            failures += 1
            out.append(dataclasses.replace(row, status=NOT_VERIFIED, reason=f"{type(error).__name__}: {error}"))
            continue
        if verdict.problems:
            failures += 1
            out.append(dataclasses.replace(row, status=MISMATCH, reason=f"on {where}: " + "; ".join(verdict.problems)))
        elif not verdict.cached:
            out.append(dataclasses.replace(row, status=patching.FALLBACK, reason=f"on {where}: {verdict.fallback}"))
        else:
            out.append(dataclasses.replace(row, status=VERIFIED, reason=f"identical to unpatched on {where}"))
    return out, failures


def summary(rows) -> str:
    """``N classes: a cached, b fallback, c excluded, d unsupported``."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        base = row.status.split(",")[0]
        counts[base] = counts.get(base, 0) + 1
    return f"{len(rows)} {'class' if len(rows) == 1 else 'classes'}: " + ", ".join(
        f"{counts[name]} {name}" for name in STATUSES
    )


def render(rows) -> list[str]:
    """Aligned table lines: model type, class, status, reason."""
    table = [("MODEL TYPE", "CLASS", "STATUS", "REASON")]
    table += [(row.rotary.model_type, row.rotary.name, row.status, row.reason) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(3)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths + [0])).rstrip() for line in table]


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

    PATTERN filters by model type or class name (case-insensitive substring,
    or a glob such as 'qwen*'). ROPE_PATCH_DISABLE and ROPE_PATCH_EXCLUDE are
    honoured as `import rope_patch.auto` honours them. Importing every
    modeling module takes a few seconds.
    """
    if not verify and (device or dtype):
        raise click.UsageError("--device and --dtype only apply with --verify")
    device = check_device(device or "cpu") if verify else None
    dtype = (dtype or "float32") if verify else None
    wanted = wanted.lower() if wanted else None
    progress = Progress()
    failures = 0
    try:
        with _model_code_contained(), _patched_like_auto():
            rows, not_imported = collect(pattern, wanted, progress)
            if verify:
                rows, failures = verify_rows(rows, device, dtype, progress)
    finally:
        progress.clear()
    if not_imported:
        for failure in not_imported:
            click.echo(f"note: {failure.module} not imported, its classes are not listed: {failure.reason}", err=True)
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        for line in render(rows):
            click.echo(line)
        if verify:
            click.echo(f"verified on {device} {dtype}: {failures} cached classes not proven identical")
        click.echo(summary(rows))
    if failures:
        sys.exit(1)
