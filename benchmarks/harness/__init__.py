"""The measuring harness behind the scripts in ``benchmarks/`` (not shipped
with rope_patch; it assumes a source checkout).

- :mod:`common` -- dtype names, the benchmark models (``rope-patch bench``'s
  table) and per-call latency by model type
- :mod:`generate` -- greedy ``generate`` patched vs unpatched vs floor, tokens compared
- :mod:`memory` -- bytes held by a module's tables after real use
- :mod:`imports` -- what ``import rope_patch.auto`` costs in fresh interpreters
- :mod:`machine` -- the machine and versions, for a report's header
- :mod:`gpu` -- the parts of ``gpu_check.py``, one module each, and what they share

Per-call latency itself is :mod:`rope_patch.diagnostics.latency` (the
``rope-patch bench`` command uses it too). Scripts put the repository root
on ``sys.path`` and import these as ``harness.<module>``.
"""
