"""The contract for rope types that change the module's state between
calls: every class computed through transformers' ``dynamic_rope_update``,
built with a dynamic (NTK) and with a longrope config
(rope_patch.diagnostics.repairs.with_rope_type), is called past the
original maximum and back against an unpatched twin
(rope_patch.diagnostics.verify.verify_rope_type): identical outputs and
module state after every call, and answered from tables. A file of its own
so that it runs beside the main contract on the other test worker."""

import pytest

from rope_patch.diagnostics.scan import scan_catalog
from rope_patch.diagnostics.verify import verify_rope_type
from rope_patch.status import Status
from tests import expected

CATALOG = scan_catalog().rotaries

CHANGING = ("dynamic", "longrope")


@pytest.mark.parametrize("rope_type", CHANGING)
def test_changing_rope_types_of_every_class(rope_type, patched):
    """Every class computed through transformers' dynamic_rope_update, with
    a dynamic or longrope config, called past the original maximum and back:
    identical outputs and module state after every call, and answered from
    tables. One test per rope type over all classes (each check is small)."""
    checked, problems, uncached = 0, [], []
    for rotary in CATALOG:
        result = verify_rope_type(rotary, rope_type)
        if result is None:
            continue
        checked += 1
        problems += [f"{rotary.name}: {problem}" for problem in result.problems]
        if result.status is not Status.CACHED:
            uncached.append(f"{rotary.name}: {result.reason}")
    assert checked >= expected.MIN_CACHED // 2, f"only {checked} classes could be checked with {rope_type}"
    assert not problems, "\n".join(problems)
    assert len(uncached) <= checked // 10, "\n".join(uncached)
