"""``rope-patch check MODEL``: does rope_patch help *my* model?

MODEL is a Hub model id (only its config.json is fetched, through
transformers' own loading, honouring HF_HUB_OFFLINE and the local cache),
a model folder (its ``config.json``; no weights needed) or a
``config.json``. The command finds the rotary classes the config's model
instantiates (the model, or its remote code with ``--trust-remote-code``,
built from the config on the meta device: rope_patch.diagnostics.skeleton),
builds one of each as the model builds it, and reports what rope_patch does
with it there: the rope type, answered from tables or why not (the
runtime's own reason, from rope_patch.cache_info), bit-identity proven
against the unpatched forward on ``--device`` / ``--dtype``
(rope_patch.diagnostics.verify), and the per-call speed-up at decode and
prefill (rope_patch.diagnostics.latency). When the model cannot be built on
the meta device, every rotary class of its modeling modules is checked, and
the report says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING, cast

import click

import rope_patch
from rope_patch.cli._common import (
    DEVICES,
    DTYPES,
    check_device,
    model_code_contained,
    patched_like_auto,
    quiet,
    torch_dtype,
)
from rope_patch.status import Status, classify

if TYPE_CHECKING:
    from rope_patch.diagnostics.skeleton import ModelSource

#: The variables that switch Hugging Face Hub access off.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Shapes timed: decode of one token, a 512-token prefill.
TIMED_SHAPES = ((1, 1), (1, 512))


@dataclasses.dataclass
class Finding:
    """One rotary class of the model, as checked."""

    name: str
    module: str
    status: str
    reason: str = ""
    rope_type: object = None
    identical: bool | None = None
    problems: list = dataclasses.field(default_factory=list)
    timing: list = dataclasses.field(default_factory=list)
    timing_note: str = ""
    #: paths of the model's modules of this class (None: the model was not built)
    held: list | None = None
    #: why some calls of the checked instance were computed unpatched (the runtime's reasons)
    unpatched: list = dataclasses.field(default_factory=list)


def load_config(model: str, trust_remote_code: bool, revision: str | None = None):
    """The config of ``model`` and where its files come from.

    Args:
        model: a folder with config.json, a config.json, or a Hub model id
            (only its config is fetched, through transformers' own loading:
            the local cache first, and nothing else under HF_HUB_OFFLINE=1).
        revision: the Hub revision (branch, tag or commit) of a model id.

    Raises:
        click.BadParameter / click.UsageError naming ``model`` and the problem.
    """
    import transformers

    if os.path.exists(model):
        if revision is not None:
            raise click.BadParameter(f"{model} is a local path: --revision is for Hub model ids", param_hint="MODEL")
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise click.BadParameter(f"{model}: no config.json in this folder", param_hint="MODEL")
        source = _source(model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model)))
    elif model.count("/") <= 1 and not model.startswith((".", "/", "~")) and not model.endswith(".json"):
        source = _source(model, revision)
    else:
        raise click.BadParameter(f"{model}: no such file or folder (nor a Hub model id)", param_hint="MODEL")
    try:
        config = transformers.AutoConfig.from_pretrained(
            model, trust_remote_code=trust_remote_code, **({"revision": revision} if revision else {})
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise click.UsageError(f"{model} uses remote code: pass --trust-remote-code to load it") from None
        raise click.UsageError(f"{model}: not a transformers config: {error}") from None
    except OSError as error:
        if source.location == model and _offline():
            raise click.UsageError(
                f"{model}: not a local path, and the Hub model id{f' at revision {revision}' if revision else ''} "
                "is not in the local Hugging Face cache while offline (HF_HUB_OFFLINE is set)"
            ) from None
        raise click.UsageError(f"{model}: {error}") from None
    return config, source


def _source(location: str, revision: str | None = None) -> ModelSource:
    from rope_patch.diagnostics.skeleton import ModelSource  # imports torch: not for `rope-patch info`

    return ModelSource(location, revision)


def _offline() -> bool:
    """Hub access is off (HF_HUB_OFFLINE, or transformers' older TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in OFFLINE_VARIABLES)


def model_modules(config, source: ModelSource, trust_remote_code: bool) -> list:
    """The modules that define the model of ``config`` and of its sub-configs."""
    from rope_patch.diagnostics.configs import config_family
    from rope_patch.diagnostics.skeleton import base_model_class

    modules = []
    family, _ = config_family(config)
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map and trust_remote_code:
        for reference in auto_map.values():
            if isinstance(reference, str) and reference.split(".")[0].startswith("modeling"):
                cls = source.remote_class(reference)
                modules.append(sys.modules[cls.__module__])

    for member in family:
        cls = base_model_class(getattr(member, "model_type", None))
        if cls is not None:
            modules.append(importlib.import_module(cls.__module__))
    return list({id(module): module for module in modules}.values())


def model_rotaries(config, source: ModelSource, trust_remote_code: bool, notes: list[str]) -> list:
    """``(RotaryClass, Held or None)`` for every rotary class the model of
    ``config`` instantiates (rope_patch.diagnostics.skeleton); when it
    cannot be built on the meta device, every rotary class of its modeling
    modules, with None, and a line in ``notes`` saying so."""
    from rope_patch.diagnostics.skeleton import SkeletonError, held_rotaries, model_class
    from rope_patch.discovery import describe, rotary_classes

    cls = model_class(config, source, trust_remote_code)
    if cls is not None:
        try:
            return [(describe(held.cls), held) for held in held_rotaries(cls, config)]
        except SkeletonError as error:
            problem = f"the model cannot be built on the meta device ({error})"
    else:
        problem = "no model class for this config"
    notes.append(f"{problem}: every rotary class of its modeling modules is checked, used or not")
    return [
        (rotary, None)
        for module in model_modules(config, source, trust_remote_code)
        for rotary in rotary_classes(module)
    ]


def check_model(
    config, source: ModelSource, device: str, dtype: str, trust_remote_code: bool, timing: bool, notes=None
):
    """One Finding per rotary class the model instantiates (patching must be
    active); ``notes`` receives lines about how the classes were found."""
    from rope_patch import settings as settings_module
    from rope_patch.diagnostics import latency
    from rope_patch.diagnostics.instances import Instance, InstantiationError, instance_from_config, layer_types_of
    from rope_patch.diagnostics.verify import verify_instance
    from rope_patch.discovery import POSITIONS

    findings = []
    for rotary, held in model_rotaries(config, source, trust_remote_code, [] if notes is None else notes):
        rope_patch.patch_class(rotary.cls)  # remote code loaded just now, or a class the hooks missed
        # patch_class() above raised unless patching is active
        decision = classify(rotary, cast(settings_module.Settings, settings_module.active))
        finding = Finding(rotary.name, rotary.module, str(decision.status), decision.reason)
        finding.held = None if held is None else list(held.paths)
        findings.append(finding)
        if decision.status is not Status.CACHED:
            continue
        module = held.build(device) if held is not None else None
        if module is not None:
            built = Instance(module, layer_types_of(module))
        else:
            try:
                built = instance_from_config(rotary, config, device)
            except InstantiationError as error:
                finding.status, finding.reason = "not used", f"cannot be built from this config: {error}"
                continue
        finding.rope_type = getattr(built.module, "rope_type", None)
        result = verify_instance(rotary, built, device, (torch_dtype(dtype),))
        finding.status, finding.reason = str(result.status), result.reason
        finding.identical, finding.problems = not result.problems, list(result.problems)
        if result.status is Status.CACHED:
            finding.unpatched = list(rope_patch.cache_info(built.module).unpatched)
        if timing and result.status is Status.CACHED and not result.problems:
            if rotary.convention != POSITIONS:
                finding.timing_note = "not timed: the timing covers forward(x, position_ids) only"
                continue
            layer_type = built.layer_types[0]
            try:
                finding.timing = latency.measure(
                    built.module, torch_dtype(dtype), TIMED_SHAPES, device=device, layer_type=layer_type
                )
            except (RuntimeError, AssertionError) as error:
                finding.timing_note = f"not timed: {error}"
    return findings


#: Module paths shown per class at most.
SHOWN_PATHS = 3


def render(findings, config, path, device, dtype, notes=()) -> list[str]:
    import transformers

    lines = [f"{path}: model type {config.model_type} (transformers {transformers.__version__}), on {device} {dtype}"]
    lines += [f"note: {note}" for note in notes]
    if not findings:
        lines.append("no rotary embedding class found for this model type: rope_patch does nothing for it")
        return lines
    for finding in findings:
        rope_type = f", rope type {finding.rope_type}" if finding.rope_type is not None else ""
        lines.append(
            f"{finding.name}{rope_type}: {finding.status}" + (f" ({finding.reason})" if finding.reason else "")
        )
        if finding.held:
            shown = ", ".join(finding.held[:SHOWN_PATHS]) + (", ..." if len(finding.held) > SHOWN_PATHS else "")
            lines.append(f"  held by {len(finding.held)} module{'s' if len(finding.held) > 1 else ''}: {shown}")
        lines += [f"  computed unpatched: {reason}" for reason in finding.unpatched]
        if finding.identical is not None:
            if finding.identical:
                lines.append(
                    "  bit-identical to the unpatched forward (decode, prefill, batch, random, repeated, int32)"
                )
            else:
                lines += ["  MISMATCH:"] + [f"    {problem}" for problem in finding.problems]
        for row in finding.timing:
            lines.append(
                f"  per call {row.shape[0]}x{row.shape[1]}: unpatched {row.unpatched_us:.1f} us, patched "
                f"{row.patched_us:.1f} us: {row.speedup:.2f}x"
            )
        if finding.timing_note:
            lines.append(f"  {finding.timing_note}")
    cached = [f for f in findings if f.status == "cached"]
    lines.append(
        f"verdict: {len(cached)} of {len(findings)} rotary classes answered from tables"
        + ("" if cached else ": rope_patch does not speed up this model")
    )
    return lines


@click.command("check", short_help="Does rope_patch help my model? (a Hub model id, a model folder or config.json)")
@click.argument("model")
@click.option("--revision", help="Hub revision of MODEL (a branch, tag or commit); default: the default branch.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Load the model's own code (auto_map), as transformers would.")
@click.option("--no-timing", is_flag=True, help="Skip the per-call timing (a few seconds per class).")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
def check_command(model, revision, device, dtype, trust_remote_code, no_timing, as_json):
    """For MODEL (a Hub model id, a folder with config.json, or a
    config.json; only the config is read, no weights): which rotary classes and rope types its config gets,
    whether rope_patch answers them from tables (and why not), bit-identity
    proven on a rotary built from that exact config, and the per-call
    speed-up there. Exits 1 on a mismatch."""
    check_device(device)
    with model_code_contained(), quiet("rope_patch.diagnostics"):
        config, source = load_config(model, trust_remote_code, revision)
        with patched_like_auto():
            if not rope_patch.is_patched():
                raise click.UsageError("rope_patch is not patching here (ROPE_PATCH_DISABLE, or unsupported versions)")
            notes: list[str] = []
            findings = check_model(config, source, device, dtype, trust_remote_code, not no_timing, notes)
    if as_json:
        rows = []
        for finding in findings:
            row = dataclasses.asdict(finding)
            row["rope_type"] = (
                finding.rope_type if isinstance(finding.rope_type, (str, dict, type(None))) else str(finding.rope_type)
            )
            row["timing"] = [
                {"shape": list(r.shape), "unpatched_us": r.unpatched_us, "patched_us": r.patched_us}
                for r in finding.timing
            ]
            rows.append(row)
        click.echo(
            json.dumps(
                {"model_type": config.model_type, "device": device, "dtype": dtype, "notes": notes, "rotaries": rows},
                indent=2,
            )
        )
    else:
        for line in render(findings, config, model, device, dtype, notes):
            click.echo(line)
    if any(f.identical is False for f in findings):
        sys.exit(1)
