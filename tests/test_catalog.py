"""Scanning: every rotary class transformers ships is found, modules that
cannot be imported are reported (only for a missing optional package), and a
pattern selects modules from their source files without importing others.

Building and proving every class is the contract test's (test_contract.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from rope_patch.diagnostics.scan import candidate_modules, scan_catalog
from tests import expected
from tests.conftest import subprocess_env

CATALOG = scan_catalog()


def test_scan_finds_every_rotary_class_once():
    assert len(CATALOG.rotaries) >= expected.MIN_CLASSES, f"only {len(CATALOG.rotaries)} rotary classes found"
    names = {(r.module, r.name) for r in CATALOG.rotaries}
    assert len(names) == len(CATALOG.rotaries), "a class was listed twice"


def test_only_missing_optional_packages_stop_an_import():
    """Every module the scan could not import is missing an optional package
    (torchaudio, say), not failing for a reason that would hide a bug."""
    unexpected = [f"{f.module}: {f.reason}" for f in CATALOG.failures if not f.missing_package]
    assert not unexpected, "modules failed to import for other reasons:\n" + "\n".join(unexpected)


def test_a_pattern_selects_modules_by_model_type_or_declared_class_name():
    assert candidate_modules("llama") == ["transformers.models.llama.modeling_llama"]
    assert candidate_modules("LlamaRotaryEmbedding") == ["transformers.models.llama.modeling_llama"]
    qwen2 = candidate_modules("qwen2*")
    assert "transformers.models.qwen2_vl.modeling_qwen2_vl" in qwen2
    assert all(".qwen2" in name for name in qwen2)
    assert candidate_modules("nosuchmodel") == []
    found = {(r.module, r.name) for r in scan_catalog(pattern="*VisionRotaryEmbedding").rotaries}
    assert found == {(r.module, r.name) for r in CATALOG.rotaries if r.name.lower().endswith("visionrotaryembedding")}


def test_a_pattern_imports_only_the_matching_modules():
    code = textwrap.dedent(
        """
        import sys
        from rope_patch.diagnostics.scan import scan_catalog
        scan_catalog(pattern="qwen3")
        print(sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m))
        """
    )
    out = subprocess.run(  # the return code is checked below
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr
    imported = eval(out.stdout.strip().splitlines()[-1])
    assert "transformers.models.qwen3.modeling_qwen3" in imported
    assert not [m for m in imported if ".qwen3." not in m and not m.startswith("transformers.models.auto")], imported
