"""Proving bit-identity of one rotary module on this machine: the patched
forward against the unpatched one over decode, prefill, random, repeated and
3-D (M-RoPE) positions. Used by ``rope-patch list --verify`` and the GPU check."""

from __future__ import annotations

import dataclasses

import torch

from rope_patch import tables
from rope_patch.identity import difference
from rope_patch.patching import disabled

HIDDEN = 8  # rotary forwards read only x's device and dtype


def position_cases(limit: int, device="cpu") -> dict[str, torch.Tensor]:
    """Named position_ids patterns below ``limit`` (at least 2): 2-D
    (batch, seq) ones, and 3-D (axes, batch, seq) ones as multimodal RoPE
    (M-RoPE) models pass them; a forward that rejects a form must make the
    patched call raise alike."""
    generator = torch.Generator().manual_seed(0)
    top = max(2, min(limit, 4096))
    prefill = torch.arange(min(128, top // 2))[None].expand(4, -1) + torch.tensor([[0], [1], [5], [top // 2 - 1]])
    side = max(1, min(6, int(top**0.5)))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([torch.zeros(side * side, dtype=torch.long), rows.flatten(), cols.flatten()])
    cases = {
        "decode 1x1": torch.tensor([[top - 1]]),
        "decode 8x1": torch.randint(0, top, (8, 1), generator=generator),
        "prefill 1x512": torch.arange(min(512, top))[None],
        "prefill 4x128 offset": prefill,
        "random 3x64": torch.randint(0, top, (3, 64), generator=generator),
        "repeated": torch.tensor([[0, 0, top - 1, top - 1, 1, 1]]),
        "M-RoPE text 3x1x64": torch.arange(min(64, top))[None].expand(3, 1, -1),
        "M-RoPE image grid 3x2xN": grid[:, None].expand(3, 2, -1) + torch.tensor([0, 1]).view(1, 2, 1),
        "M-RoPE decode 3x4x1": torch.randint(0, top, (1, 4, 1), generator=generator).expand(3, -1, -1),
        "M-RoPE random axes 3x2x16": torch.randint(0, top, (3, 2, 16), generator=generator),
    }
    return {name: positions.to(device) for name, positions in cases.items()}


@dataclasses.dataclass
class Verdict:
    """Outcome of verifying one module.

    Attributes:
        cached: every call was answered from a table.
        problems: "case: difference" lines where patched != unpatched
            (must be empty, cached or not).
        fallback: why the module is computed unpatched, if it is.
    """

    cached: bool
    problems: list[str]
    fallback: str | None


def verify_module(module, layer_types=(None,), device="cpu", dtype=torch.float32) -> Verdict:
    """Compare patched and unpatched outputs of ``module`` (patching must be
    active) for every position case, layer type, first use and table hit."""
    problems = []
    limit = tables._max_position_embeddings(module) or 4096
    for layer_type in layer_types:
        extra = () if layer_type is None else (layer_type,)
        for name, positions in position_cases(limit, device).items():
            x = torch.randn(*positions.shape[-2:], HIDDEN, device=device).to(dtype)
            try:
                with disabled():
                    expected = module(x, positions, *extra)
            except Exception as error:  # noqa: BLE001 - the patched call must raise alike
                try:
                    module(x, positions, *extra)
                    problems.append(f"{name}: unpatched raised {error!r}, patched did not")
                except type(error):
                    pass
                continue
            for attempt in ("first use", "table hit"):
                problem = difference(expected, module(x, positions, *extra))
                if problem:
                    problems.append(f"{name} ({attempt}, layer_type={layer_type}): {problem}")
    state = tables.state_of(module)
    fallback = state.fallback if state is not None else "never reached the table path"
    built = state is not None and any(t is not None for t in state.tables.values())
    if fallback is None and not built:
        fallback = "computed unpatched for this configuration (position-dependent rope type)"
    return Verdict(cached=fallback is None and built, problems=problems, fallback=fallback)
