"""Diagnostics: finding every rotary class, building instances of them, and
proving the patched forward against the unpatched one. Used by the CLI, the
contract test and the GPU check; nothing here is on the patching path.

- :mod:`~rope_patch.diagnostics.scan` -- every rotary class the installed transformers ships
- :mod:`~rope_patch.diagnostics.configs` -- which config to build a class from, and what a config says
- :mod:`~rope_patch.diagnostics.repairs` -- repaired default configs, and the rope-type variants verified
- :mod:`~rope_patch.diagnostics.instances` -- an instance of a class from its default config
- :mod:`~rope_patch.diagnostics.verify` -- ``verify_class``: patched vs unpatched, and the outcome
- :mod:`~rope_patch.diagnostics.skeleton` -- the rotary modules a model holds (built on the meta device)
- :mod:`~rope_patch.diagnostics.latency` -- per-call latency of one rotary: unpatched, patched, the floor
"""
