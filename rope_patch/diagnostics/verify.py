"""Proving one rotary class: build it, call it patched and unpatched over
many position patterns, and say what the runtime did with it.

:func:`verify_class` is the one driver behind the contract test
(tests/test_contract.py), ``rope-patch list`` (``probe`` cases) and
``rope-patch list --verify``, and the GPU check: all of them build the same
instance (rope_patch.diagnostics.instances, config repairs included) and
count by the same rule.

Counting rule. A class is *M-RoPE* when 3-D positions are its models' real
form: its forward recomposes the axes into one ``(batch, seq, dim)`` output,
or it rejects 2-D positions but takes 3-D ones (the transformers 4.x Qwen2-VL
family, which recomposes in attention). An M-RoPE class is cached only when
its 3-D calls are answered from tables; when only its 2-D calls are, it is a
fallback. Any other class is cached when its calls are answered from
tables; its 3-D calls (position-elementwise forwards treat the axis as one
more batch dimension) must be bit-identical but do not change its status.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing

import torch

import rope_patch
from rope_patch import settings as settings_module
from rope_patch.diagnostics.instances import Instance, InstantiationError, build_instance
from rope_patch.discovery import POSITIONS, PREFIX, RotaryClass
from rope_patch.identity import difference
from rope_patch.status import Status, classify, outcome

HIDDEN = 8  # rotary forwards read only x's device and dtype
#: The positions of ``probe`` verification: one short prefill, 2-D and 3-D.
PROBE_POSITIONS = 4
#: Largest position the cases use.
TOP = 5000


@dataclasses.dataclass(frozen=True)
class ClassOutcome:
    """What verifying one class found.

    Attributes:
        rotary: the class.
        status: CACHED, FALLBACK, EXCLUDED or UNSUPPORTED (see the counting rule).
        reason: why it is not cached, or notes on a cached one ("" if none).
        problems: "case: difference" lines where patched != unpatched; must be
            empty whatever the status.
        mrope: 3-D position_ids are its models' real form.
        repair: "" or what was repaired in its default config.
        built: an instance could be built (False: reason says why not).
    """

    rotary: RotaryClass
    status: Status
    reason: str
    problems: tuple[str, ...] = ()
    mrope: bool = False
    repair: str = ""
    built: bool = True


def position_cases(limit: int, device="cpu") -> dict[str, torch.Tensor]:
    """Named 2-D ``(batch, seq)`` position_ids below ``limit``."""
    generator = torch.Generator().manual_seed(0)
    top = max(2, min(limit, TOP))
    cases = {
        "decode 1x1": torch.tensor([[top - 1]]),
        "decode 4x1": torch.randint(0, top, (4, 1), generator=generator),
        "prefill 1x64": torch.arange(64)[None] % top,
        "prefill 2x33 offset": (torch.arange(33)[None] + torch.tensor([[0], [top // 2]])) % top,
        "random 3x17": torch.randint(0, top, (3, 17), generator=generator),
        "repeated": torch.tensor([[0, 0, top - 1, top - 1, 1]]),
        "int32": (torch.arange(9)[None] % top).to(torch.int32),
    }
    return {name: positions.to(device) for name, positions in cases.items()}


def seq_len_cases(limit: int) -> dict[str, int]:
    """Named ``seq_len`` values up to ``limit``, for ``forward(x, seq_len)``."""
    top = max(2, min(limit, TOP))
    return {f"seq_len {n}": n for n in sorted({1, 2, 7, 64, 65, top // 2, top})}


def mrope_position_cases(limit: int, device="cpu") -> dict[str, torch.Tensor]:
    """Named 3-D ``(axes, batch, seq)`` position_ids below ``limit``, as
    multimodal models pass them: text, image grids, decode after an image
    with a different rope_delta per sequence, random axes, int32, a view."""
    generator = torch.Generator().manual_seed(1)
    top = max(2, min(limit, TOP))
    grid = image_prompt_positions(3, (2, 4), 4)  # 15 tokens up to position 10
    other = image_prompt_positions(1, (2, 2), 10)  # 15 tokens up to position 12
    deltas = torch.tensor([-4, -40])  # rope_deltas of two prompts
    cases = {
        "text 3x1x12": torch.arange(12)[None, None].expand(3, 1, -1) % top,
        "image grid 3x1x15": grid[:, None] % top,
        "image grids 3x2x15": torch.stack([grid, other], dim=1) % top,
        "decode after image 3x2x1": ((top - 1 + deltas).clamp(min=0))[None, :, None].expand(3, -1, -1),
        "random axes 3x3x7": torch.randint(0, top, (3, 3, 7), generator=generator),
        "int32 3x1x15": (grid[:, None] % top).to(torch.int32),
        "expanded view 3x2x7": (torch.arange(7) % top).view(1, 1, -1).expand(3, 2, -1),
    }
    return {name: positions.to(device) for name, positions in cases.items()}


def image_prompt_positions(text_before: int, grid: tuple[int, int], text_after: int, start: int = 0):
    """(3, S) multimodal RoPE positions laid out like Qwen2-VL's
    get_rope_index: text on all axes (temporal, height, width), one frame of
    an ``h x w`` image grid (temporal fixed, height and width walk the grid),
    then text continuing after the largest position."""
    height, width = grid
    text = torch.arange(start, start + text_before).expand(3, -1)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    image = torch.stack([torch.zeros_like(rows), rows, cols]) + start + text_before
    after_start = int(image.max()) + 1
    after = torch.arange(after_start, after_start + text_after).expand(3, -1)
    return torch.cat([text, image, after], dim=1)


def verify_class(
    rotary: RotaryClass,
    device: str | torch.device = "cpu",
    dtypes=(torch.float32,),
    cases: str = "all",
) -> ClassOutcome:
    """Build ``rotary`` and compare patched with unpatched calls.

    Patching must be active (``rope_patch.patch()``), with the class patched
    as the settings in effect decide.

    Args:
        device: where to build and run it.
        dtypes: activation dtypes to call with.
        cases: ``"all"`` (every position pattern, first use and table hit:
            the proof) or ``"probe"`` (one short 2-D and 3-D call each: what
            ``rope-patch list`` does to let the runtime decide).

    Returns:
        The outcome; nothing is raised for a class that misbehaves.
    """
    settings = settings_module.active
    if settings is None:
        raise RuntimeError("verify_class needs rope_patch.patch() in effect")
    decision = classify(rotary, settings)
    if decision.status is not Status.CACHED:
        return ClassOutcome(rotary, decision.status, decision.reason)
    try:
        built = build_instance(rotary, device)
    except InstantiationError as error:
        return ClassOutcome(rotary, Status.FALLBACK, f"not instantiated: {error}", built=False)
    return verify_instance(rotary, built, device, dtypes, cases)


def verify_instance(rotary: RotaryClass, built: Instance, device="cpu", dtypes=(torch.float32,), cases="all"):
    """:func:`verify_class` on an instance already built (``rope-patch check``
    builds it from the user's config)."""
    module = built.module
    limit = _max_position(module)
    problems: list[str] = []
    kinds = set()
    if rotary.convention == PREFIX:  # forward(x, seq_len)
        lengths = {"probe": PROBE_POSITIONS} if cases == "probe" else seq_len_cases(limit)
        if rotary.rebuild is not None:  # a forward that rebuilds its own cache: the state is part of the answer
            problems = _compare_with_twin(module, lengths, dtypes, device)
        else:
            problems = _compare(module, lengths, (), dtypes, device)
        result = outcome(module)
        reason = "; ".join(filter(None, (result.reason, built.repair)))
        return ClassOutcome(rotary, result.status, reason, tuple(problems), False, built.repair)
    for layer_type in built.layer_types:
        extra = () if layer_type is None else (layer_type,)
        if cases == "probe":
            planar = {"probe": torch.arange(PROBE_POSITIONS, device=device)[None]}
            spatial = {"probe 3-D": planar["probe"][None].expand(3, -1, -1)}
        else:
            planar, spatial = position_cases(limit, device), mrope_position_cases(limit, device)
        problems += _compare(module, planar, extra, dtypes, device)
        if rotary.extra == "seq_len":  # the model's attention may pass it (Phi-3's does): those calls too
            for name, positions in planar.items():
                seq_len = (positions.shape[-1],)
                problems += _compare(module, {f"{name}, seq_len passed": positions}, seq_len, dtypes, device)
        kind = mrope_kind(module, extra, device)
        if kind is not None:
            kinds.add(kind)
        if kind is not None or cases == "probe":
            problems += _compare(module, spatial, extra, dtypes, device)
    result = outcome(module)
    status, reason = result.status, result.reason
    is_mrope = bool(kinds & {"recomposed", "3-D only"})
    if is_mrope and status is Status.CACHED and not result.mrope:
        status, reason = Status.FALLBACK, "M-RoPE: 3-D position_ids are not answered from tables"
    if status is Status.CACHED and is_mrope:
        reason = "M-RoPE: 3-D position_ids answered from tables"
    reason = "; ".join(filter(None, (reason, built.repair)))
    return ClassOutcome(rotary, status, reason, tuple(problems), is_mrope, built.repair)


def _max_position(module) -> int:
    from rope_patch.cache.state import max_position_embeddings

    return max_position_embeddings(module) or 4096


def _compare(module, cases: dict, extra: tuple, dtypes, device) -> list[str]:
    """Every case, every dtype: patched == unpatched (or the same exception
    type), on first use and from the table."""
    problems = []
    for dtype in dtypes:
        for name, positions in cases.items():
            shape = (1, positions, HIDDEN) if type(positions) is int else (*positions.shape[-2:], HIDDEN)
            x = torch.randn(*shape, device=device).to(dtype)
            where = f"{name} {str(dtype).replace('torch.', '')}" + (f" layer_type={extra[0]}" if extra else "")
            for attempt in ("first use", "table hit"):
                call = functools.partial(module, x, positions, *extra)
                problem = same_outcome(call, call)
                if problem:
                    problems.append(f"{where} ({attempt}): {problem}")
    return problems


def _compare_with_twin(module, lengths: dict, dtypes, device) -> list[str]:
    """For a forward that rebuilds its own cache (rope_patch.cache.rebuild):
    the module patched and an unpatched twin (a copy made before any call)
    get the same calls, growing, shrinking and growing again; outputs (or
    exception types) and the modules' whole state must be identical after
    each. Comparing on one module would let the unpatched call build the
    cache the patched call then only slices."""
    twin = copy.deepcopy(module)
    order = list(lengths.items())
    order += [(f"{name} again", n) for name, n in reversed(order)] + [(f"{name}, then", n) for name, n in order]
    problems = []
    for dtype in dtypes:
        for name, n in order:
            x = torch.randn(1, n, HIDDEN, device=device).to(dtype)
            where = f"{name} {str(dtype).replace('torch.', '')}"
            problem = same_outcome(functools.partial(twin, x, n), functools.partial(module, x, n))
            if problem is None and module_state(module) != module_state(twin):
                problem = "module state differs from the unpatched twin's"
            if problem:
                problems.append(f"{where}: {problem}")
    return problems


def same_outcome(unpatched, patched) -> str | None:
    """Why ``patched()`` is not what ``unpatched()`` is (run inside
    ``rope_patch.disabled()``): not bit-identical, or not the same exception
    type; None when it is."""
    try:
        with rope_patch.disabled():
            expected = unpatched()
    except Exception as error:  # noqa: BLE001 - the patched call must raise alike
        try:
            patched()
        except type(error):
            return None
        except Exception as other:  # noqa: BLE001
            return f"unpatched raised {error!r}, patched raised {other!r}"
        return f"unpatched raised {error!r}, patched did not"
    try:
        return difference(expected, patched())
    except Exception as error:  # noqa: BLE001
        return f"patched raised {error!r}"


def mrope_kind(module, extra: tuple, device="cpu") -> str | None:
    """How the unpatched forward takes 3-D positions whose axes differ:
    ``"recomposed"`` (one (batch, seq, dim) output), ``"3-D only"`` (it
    rejects 2-D positions), ``"per-axis"`` (the axis stays a dimension), or
    None when it rejects them."""
    positions = torch.tensor([[[0, 1, 2, 3]], [[1, 3, 0, 2]], [[2, 0, 3, 1]]], device=device)
    x = torch.randn(1, 4, HIDDEN, device=device)
    with rope_patch.disabled():
        try:
            out = module(x, positions, *extra)
        except Exception:  # noqa: BLE001 - no 3-D form
            return None
        first = out if isinstance(out, torch.Tensor) else out[0]
        if tuple(first.shape[:2]) == (1, 4):
            return "recomposed"
        try:
            module(x, positions[0], *extra)
        except Exception:  # noqa: BLE001 - 2-D rejected
            return "3-D only"
    return "per-axis"


def verify_rope_type(rotary: RotaryClass, rope_type: str, device="cpu") -> ClassOutcome | None:
    """Prove ``rotary`` with a rope type that changes the module's state
    between calls (``"dynamic"`` or ``"longrope"``): a patched module and an
    unpatched twin, built from the class's default config with that rope
    type (repairs.with_rope_type), are called with the same positions
    going past the original maximum and back; outputs and the modules'
    whole state (buffers, attributes) must be identical after every call.

    Returns:
        The outcome (CACHED when some call was answered from a table), or
        None when the class does not change state through transformers'
        ``dynamic_rope_update`` or cannot be built with that rope type.
    """
    from rope_patch.cache.families import uses_dynamic_rope_update
    from rope_patch.diagnostics.instances import constructor_arguments
    from rope_patch.diagnostics.repairs import ORIGINAL_MAX, with_rope_type
    from rope_patch.forward import original_of

    forward = original_of(rotary.cls.forward) or rotary.cls.forward
    if rotary.convention != POSITIONS or not uses_dynamic_rope_update(forward):
        return None
    try:
        built = build_instance(rotary, device)
        # a buffer (nn.Module.__getattr__ is typed Tensor | Module)
        dim = typing.cast(torch.Tensor, built.module.inv_freq).numel()
        config = with_rope_type(built.module.config, rope_type, dim)
        pair = [rotary.cls(**constructor_arguments(rotary.cls, config, device)).to(device).eval() for _ in range(2)]
    except Exception:  # noqa: BLE001 - not buildable with this rope type: not applicable
        return None
    module, twin = pair
    layer_type = built.layer_types[0]
    extra = () if layer_type is None else (layer_type,)
    problems = []
    top = 4 * ORIGINAL_MAX
    for length in (10, 11, ORIGINAL_MAX + 20, ORIGINAL_MAX + 21, 10, 11, top, ORIGINAL_MAX - 1, 3):
        positions = torch.arange(length, device=device)[None]
        x = torch.randn(1, length, HIDDEN, device=device)
        problem = same_outcome(
            functools.partial(twin, x, positions, *extra), functools.partial(module, x, positions, *extra)
        )
        if problem is None and module_state(module) != module_state(twin):
            problem = "module state differs from the unpatched twin's"
        if problem:
            problems.append(f"{rope_type} positions 0..{length - 1}: {problem}")
    result = outcome(module)
    return ClassOutcome(rotary, result.status, result.reason, tuple(problems))


def module_state(module) -> dict:
    """A module's state, comparable: every attribute, buffer and parameter
    (not private ones or submodules), tensors as (dtype, shape, bits)."""
    from rope_patch.identity import bits

    out = {}
    for name, value in {**vars(module), **module._buffers, **module._parameters}.items():
        if name.startswith("_") or isinstance(value, torch.nn.Module):
            continue
        if isinstance(value, torch.Tensor):
            out[name] = (value.dtype, tuple(value.shape), bits(value.detach()).cpu().tolist())
        else:
            out[name] = value
    return out
