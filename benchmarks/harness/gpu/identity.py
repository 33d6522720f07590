"""GPU check, part ``identity``: every rotary class of the installed
transformers proved with ``verify_class`` in fp32, bf16 and fp16."""

from __future__ import annotations

import time

from harness.gpu.run import DTYPES, Deadline, Outcome, free_memory, log


def part_identity(device, deadline: Deadline, outcome: Outcome, args) -> None:
    from rope_patch.diagnostics.scan import scan_catalog
    from rope_patch.diagnostics.verify import verify_class
    from rope_patch.status import Status

    start = time.monotonic()
    catalog = scan_catalog(pattern=args.identity_pattern)
    rotaries = catalog.rotaries[: args.limit] if args.limit else catalog.rotaries
    log(
        f"identity: {len(catalog.rotaries)} rotary classes"
        + (f" matching {args.identity_pattern!r}" if args.identity_pattern else "")
        + f" ({catalog.modules} modules, {len(catalog.failures)} failed to import; "
        f"{time.monotonic() - start:.1f} s); verifying {len(rotaries)}"
    )
    counts = dict.fromkeys(("verified", "cached", "fallback", "unsupported", "excluded", "not built"), 0)
    mismatches = 0
    for index, rotary in enumerate(rotaries):
        if deadline.passed():
            outcome.skip("identity", f"deadline after {index} of {len(rotaries)} classes")
            break
        label = f"{rotary.model_type}.{rotary.name}"
        try:
            result = verify_class(rotary, device, DTYPES, cases="all")
        except Exception as error:  # noqa: BLE001 - the verifier itself broke: a failure
            outcome.fail(f"identity {label}: verify_class raised {error!r}")
            continue
        for problem in result.problems:
            mismatches += 1
            outcome.fail(f"identity {label}: {problem}")
        if result.status is Status.UNSUPPORTED:
            counts["unsupported"] += 1
        elif result.status is Status.EXCLUDED:
            counts["excluded"] += 1
        elif not result.built:
            counts["not built"] += 1
            log(f"  not built: {label}: {result.reason[:160]}")
        else:
            counts["verified"] += 1
            cached = result.status is Status.CACHED
            counts["cached" if cached else "fallback"] += 1
            if not cached:
                log(f"  computed unpatched (not a failure): {label}: {result.reason[:160]}")
        if index % 20 == 19:
            free_memory(device)
    line = (
        f"identity on {device}: {counts['verified']} classes verified in fp32/bf16/fp16 "
        f"({counts['cached']} answered from tables, {counts['fallback']} computed unpatched by design), "
        f"{counts['unsupported']} unsupported, {counts['excluded']} excluded, {counts['not built']} not built; "
        f"{mismatches} mismatches"
    )
    outcome.check("identity", line)
