"""``import rope_patch.auto`` in fresh interpreters: every import order, and
every environment opt-out. Each case runs in a subprocess because patching is
process-wide and import order is the thing under test."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import subprocess_env

REPORT = textwrap.dedent(
    """
    import json, sys
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3
    from rope_patch.forward import original_of
    def state(cls):
        return "wrapped" if original_of(cls.__dict__["forward"]) else "original"
    print(json.dumps({
        "llama": state(modeling_llama.LlamaRotaryEmbedding),
        "qwen3": state(modeling_qwen3.Qwen3RotaryEmbedding),
    }))
    """
)


def run_child(code, **env):
    result = subprocess.run(  # the return code is checked below
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def child_report(code, **env):
    result = run_child(code + REPORT, **env)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


ORDERS = {
    "auto before transformers": "import rope_patch.auto\nimport transformers\n",
    "auto after transformers": "import transformers\nimport rope_patch.auto\n",
    "auto after a modeling module": "from transformers.models.llama import modeling_llama\nimport rope_patch.auto\n",
    "auto after the model classes": (
        "from transformers import LlamaForCausalLM, Qwen3ForCausalLM\nimport rope_patch.auto\n"
    ),
}


@pytest.mark.parametrize("order", ORDERS)
def test_every_import_order_wraps_once(order):
    report, _ = child_report(ORDERS[order])
    assert report == {"llama": "wrapped", "qwen3": "wrapped"}


def test_auto_imports_no_modeling_module_and_no_torch():
    result = run_child(
        """
        import sys, transformers
        import rope_patch.auto
        print(sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m))
        print("torch" in sys.modules)
        """
    )
    modeling, torch_loaded = result.stdout.strip().splitlines()[-2:]
    assert modeling == "[]"
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.57 imports torch itself
        assert torch_loaded == "False"


def test_disable_variable_patches_nothing():
    report, _ = child_report("import rope_patch.auto\n", ROPE_PATCH_DISABLE="1")
    assert report == {"llama": "original", "qwen3": "original"}


@pytest.mark.parametrize(
    "value,expected",
    [
        (" QWEN3* , llamarotaryembedding ", {"llama": "original", "qwen3": "original"}),  # case, spaces, glob, class
        ("qwen3", {"llama": "wrapped", "qwen3": "original"}),
    ],
)
def test_exclude_variable(value, expected):
    report, _ = child_report("import rope_patch.auto\n", ROPE_PATCH_EXCLUDE=value)
    assert report == expected


def test_exclude_variable_forms_in_process(monkeypatch):
    """The other forms (the variable is parsed by the same code at patch()
    time; the subprocess cases above cover import rope_patch.auto)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    import rope_patch
    from rope_patch.forward import original_of

    for value, llama, qwen3 in (("LlamaRotaryEmbedding", False, True), ("*", False, False), ("qwen*", True, False)):
        monkeypatch.setenv("ROPE_PATCH_EXCLUDE", value)
        assert rope_patch.patch()
        wrapped = [
            original_of(cls.__dict__["forward"]) is not None
            for cls in (modeling_llama.LlamaRotaryEmbedding, modeling_qwen3.Qwen3RotaryEmbedding)
        ]
        rope_patch.unpatch()
        assert wrapped == [llama, qwen3], value


def test_unparseable_variable_warns_and_patches_nothing():
    report, stderr = child_report("import rope_patch.auto\n", ROPE_PATCH_EXCLUDE="qwen3;llama")
    assert report == {"llama": "original", "qwen3": "original"}
    assert "ROPE_PATCH_EXCLUDE" in stderr


@pytest.mark.parametrize(
    "name,value",
    [("ROPE_PATCH_DISABLE", "maybe"), ("ROPE_PATCH_MAX_POSITIONS", "lots"), ("ROPE_PATCH_VERBOSITY", "chatty")],
)
def test_other_unparseable_variables_in_process(name, value, monkeypatch, caplog):
    import rope_patch

    monkeypatch.setenv(name, value)
    with caplog.at_level("WARNING", logger="rope_patch"):
        assert rope_patch.patch() is False
    assert not rope_patch.is_patched()
    assert name in caplog.text


def test_a_failing_hook_never_breaks_the_users_import():
    result = run_child(
        """
        import rope_patch.discovery as d
        def boom(module):
            raise RuntimeError("hook failure")
        d.rotary_classes = boom
        import rope_patch.auto
        from transformers.models.llama import modeling_llama
        print("imported", modeling_llama.LlamaRotaryEmbedding.__name__)
        """
    )
    assert "imported LlamaRotaryEmbedding" in result.stdout
    assert "could not patch transformers.models.llama.modeling_llama" in result.stderr


def test_unsupported_versions_warn_once_and_do_nothing():
    result = run_child(
        """
        import rope_patch.versions as v
        v.SUPPORTED["transformers"] = ((99,), (100,))
        import rope_patch.auto, rope_patch
        rope_patch.patch()
        print("patched", rope_patch.is_patched())
        """
    )
    assert "patched False" in result.stdout
    assert result.stderr.count("is not supported") == 1


def test_missing_transformers_warns_and_does_nothing():
    result = run_child(
        """
        import importlib.metadata as md
        real = md.version
        def version(name):
            if name == "transformers":
                raise md.PackageNotFoundError(name)
            return real(name)
        md.version = version
        import rope_patch.auto, rope_patch
        print("patched", rope_patch.is_patched())
        """
    )
    assert "patched False" in result.stdout
    assert "transformers is not installed" in result.stderr
