"""The contract, over EVERY ``*RotaryEmbedding`` class of the installed
transformers: with patching active, each forward returns exactly what the
unpatched forward returns (bits, dtype, shape, device, strides) for fp32,
bf16 and fp16, decode, prefill, batch > 1, random, repeated and int32
positions, on first use and from the table; or raises the same exception.
3-D position_ids (axes, batch, seq) are checked too, for every class whose
unpatched forward accepts them: text-only, image grids, decode after an
image with a different rope_delta per sequence, random axes, int32,
expanded views.

Each class is proven by rope_patch.diagnostics.verify.verify_class (the
driver ``rope-patch list --verify`` and the GPU check use too), which also
says whether the class is answered from tables and, if not, why; its
docstring states the counting rule for M-RoPE classes. Every class must
build from its default config (repaired where the default config cannot
run its own model: the instance says so).

The coverage test asks for the outcome of every class itself (memoised, so
the parametrized tests and it share the work in any order or selection).
The session summary prints the coverage (see conftest.py), from the
coverage test.
"""

import functools

import pytest
import torch

import rope_patch
from rope_patch.diagnostics.scan import scan_catalog
from rope_patch.diagnostics.verify import verify_class
from rope_patch.forward import original_of
from rope_patch.status import Status
from tests import expected

CATALOG = scan_catalog().rotaries
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def contract_outcome(rotary):
    """verify_class over every pattern and dtype, once per class per run,
    under a patch of default settings."""
    ours = not rope_patch.is_patched()
    if ours:
        assert rope_patch.patch()
    try:
        return verify_class(rotary, "cpu", DTYPES)
    finally:
        if ours:
            rope_patch.unpatch()


def contract_outcomes() -> dict:
    """Every class's outcome (computed now for those not run yet)."""
    return {rotary: contract_outcome(rotary) for rotary in CATALOG}


@pytest.mark.parametrize("rotary", CATALOG, ids=[f"{r.model_type}.{r.name}" for r in CATALOG])
def test_patched_forward_is_bit_identical(rotary):
    result = contract_outcome(rotary)
    if result.status is Status.UNSUPPORTED:
        # Not wrapped: the class keeps its own forward object.
        assert original_of(rotary.cls.__dict__.get("forward")) is None
        return
    assert result.built, result.reason
    assert not result.problems, "\n".join(result.problems)


def coverage_lines(outcomes) -> list[str]:
    """The coverage summary: cached (M-RoPE included) / total, why the others
    are not, and notes on cached ones (a repaired config)."""
    counts = {}
    for result in outcomes.values():
        key = f"{result.status}{' (M-RoPE)' if result.mrope and result.status is Status.CACHED else ''}"
        counts[key] = counts.get(key, 0) + 1
    cached = sum(n for key, n in counts.items() if key.startswith("cached"))
    lines = [f"rope_patch contract coverage: {cached} cached / {len(outcomes)} classes ({counts})"]
    noted = [r for r in outcomes.values() if r.status is not Status.CACHED or r.repair]
    shared = {}
    for result in noted:
        shared.setdefault((result.status, result.reason), []).append(result)
    lines.extend(
        f"  {result.status!s:12} {result.rotary.module}.{result.rotary.name}: {result.reason}"
        for result in sorted(noted, key=lambda r: (r.rotary.module, r.rotary.name))
        if len(shared[result.status, result.reason]) <= 3
    )
    for (status, reason), results in shared.items():
        if len(results) > 3:
            names = ", ".join(r.rotary.name for r in results)
            lines.append(f"  {status!s:12} {len(results)} classes: {reason} ({names})")
    return lines


def test_coverage_meets_the_bar(record_property):
    outcomes = contract_outcomes()
    record_property("rope_patch_coverage", coverage_lines(outcomes))
    assert len(outcomes) >= expected.MIN_CLASSES
    cached = {r.name for r, result in outcomes.items() if result.status is Status.CACHED}
    missing = [name for name in expected.MUST_CACHE if name not in cached]
    assert not missing, f"expected cached: {missing}"
    assert len(cached) >= expected.MIN_CACHED, f"only {len(cached)} classes cached"
    mrope = sum(result.status is Status.CACHED and result.mrope for result in outcomes.values())
    assert mrope >= expected.MIN_CACHED_MROPE, f"only {mrope} M-RoPE classes cached"
