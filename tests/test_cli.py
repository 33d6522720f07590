"""The ``rope-patch`` command line: ``list``, ``info``, ``bench`` through
click's CliRunner, ``run`` and the quickstart example in subprocesses.

Listing imports every modeling module (seconds), so the full listing runs
once per module (the ``listing`` fixture); other listing tests narrow it with
a PATTERN or a status that needs no instances, and compare with it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

import rope_patch
from rope_patch import versions
from rope_patch.cli import main
from rope_patch.cli.run import BOOTSTRAP_DIR
from tests import expected as expectations
from tests.conftest import ROPE_VARIABLES, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"model_type", "module", "class", "status", "reason"}
STATUSES = {"cached", "fallback", "excluded", "unsupported"}
SUMMARY = re.compile(r"^(\d+) class(?:es)?: (\d+) cached, (\d+) fallback, (\d+) excluded, (\d+) unsupported$")


def invoke(*args, **env):
    """Run ``rope-patch ARGS`` in-process with only the given ROPE_PATCH_*
    variables set (None for the others removes them)."""
    environment = dict.fromkeys(ROPE_VARIABLES)
    environment.update(env)
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps them apart
    return runner.invoke(main, list(args), env=environment, catch_exceptions=False)


def list_json(*args, **env) -> list[dict]:
    """``rope-patch list --json ARGS``: the rows, after checking that stdout
    is nothing but the JSON list."""
    result = invoke("list", "--json", *args, **env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # fails if anything else is on stdout
    assert isinstance(rows, list)
    return rows


def key(row) -> tuple[str, str]:
    return row["module"], row["class"]


@pytest.fixture(scope="module")
def listing() -> list[dict]:
    """The full ``rope-patch list --json``, computed once."""
    return list_json()


def select(rows, predicate):
    return [row for row in rows if predicate(row)]


# --------------------------------------------------------------------------
# list


def test_list_json_has_every_class_with_exactly_the_documented_keys(listing):
    assert len(listing) >= expectations.MIN_CLASSES, f"only {len(listing)} rows"
    for row in listing:
        assert set(row) == KEYS, row
        assert all(isinstance(value, str) for value in row.values()), row
        assert row["status"] in STATUSES, row
        assert row["class"].endswith("RotaryEmbedding"), row
        assert row["module"].startswith(f"transformers.models.{row['model_type']}.modeling_"), row
        # Every status but cached has a reason; a cached row notes only an
        # M-RoPE class or a repaired default config.
        if row["status"] == "cached":
            assert row["reason"] == "" or row["reason"].startswith(("M-RoPE: ", "built from a repaired config")), row
        else:
            assert row["reason"], row
    assert len({key(row) for row in listing}) == len(listing), "a class is listed twice"
    assert sum(row["status"] == "cached" and not row["reason"] for row in listing) > len(listing) / 2
    statuses = {row["status"] for row in listing}
    assert {"cached", "fallback", "unsupported"} <= statuses, statuses
    assert "excluded" not in statuses, "nothing is excluded without ROPE_PATCH_* variables"


def test_list_table_pattern_and_summary_agree_with_json(listing):
    """``list '*llama*'``: the rows whose model type or class contains "llama"
    (case-insensitive), in a table ending with the counting summary."""
    result = invoke("list", "*llama*")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    expected = select(listing, lambda r: "llama" in r["model_type"] or "llama" in r["class"].lower())
    assert len(expected) >= 3  # llama, llama4, diffllama, ...
    assert lines[0].split()[:4] == ["MODEL", "TYPE", "CLASS", "STATUS"]
    body = [line.split(None, 3) for line in lines[1:-1]]
    assert [(cells[0], cells[1], cells[2]) for cells in body] == [
        (r["model_type"], r["class"], r["status"]) for r in expected
    ]
    match = SUMMARY.match(lines[-1].split(" (")[0])
    assert match, lines[-1]
    counts = [sum(r["status"] == s for r in expected) for s in ("cached", "fallback", "excluded", "unsupported")]
    assert [int(n) for n in match.groups()] == [len(expected), *counts]


def test_list_glob_pattern(listing):
    rows = list_json("QWEN3*")
    expected = select(
        listing,
        lambda r: fnmatch.fnmatchcase(r["model_type"], "qwen3*") or fnmatch.fnmatchcase(r["class"].lower(), "qwen3*"),
    )
    assert rows and rows == expected


def test_list_status_filter(listing):
    unsupported = list_json("--status", "unsupported")
    assert unsupported == select(listing, lambda r: r["status"] == "unsupported")
    cached = list_json("--status", "CACHED", "qwen*")  # case-insensitive choice, combined with a pattern
    assert cached and cached == select(
        listing,
        lambda r: (
            r["status"] == "cached" and (r["class"].lower().startswith("qwen") or r["model_type"].startswith("qwen"))
        ),
    )


def test_list_pattern_matching_nothing_says_so_and_exits_1():
    result = invoke("list", "nosuchmodel")
    assert result.exit_code == 1
    assert "no rotary class matches 'nosuchmodel'" in result.stderr and "glob" in result.stderr


def test_a_missing_optional_package_is_counted_in_the_summary_not_noted():
    """Modules that need a package that is not installed (torchaudio) are no
    classes the user could run: one count in the summary, no note per module."""
    from rope_patch.cli.listing import summary
    from rope_patch.diagnostics.scan import ImportFailure, scan_catalog
    from rope_patch.discovery import model_type_of

    missing = ModuleNotFoundError("No module named 'torchaudio'", name="torchaudio")
    broken = ImportFailure("transformers.models.x.modeling_x", RuntimeError("a bug"))
    line = summary([], [ImportFailure("transformers.models.a.modeling_a", missing), broken])
    assert (
        line == "0 classes: 0 cached, 0 fallback, 0 excluded, 0 unsupported (1 module not imported: needs torchaudio)"
    )
    real = [f for f in scan_catalog().failures if f.missing_package]
    if real:  # end to end, where this transformers has such a module (5.x: higgs_audio_v2_tokenizer)
        result = invoke("list", model_type_of(real[0].module))
        assert "note:" not in result.stderr
        assert f"not imported: needs {real[0].missing_package}" in result.stdout.strip().splitlines()[-1]


def test_unparseable_environment_excludes_every_class_naming_the_variable():
    rows = list_json("--status", "excluded", "*llama*", ROPE_PATCH_EXCLUDE="not a name!")
    assert rows and all("ROPE_PATCH_EXCLUDE" in r["reason"] for r in rows)


@pytest.fixture(scope="module")
def qwen3_excluded() -> list[dict]:
    """``ROPE_PATCH_EXCLUDE=qwen3 rope-patch list --json qwen3*``."""
    return list_json("qwen3*", ROPE_PATCH_EXCLUDE="qwen3")


def test_exclude_variable_without_a_glob_excludes_only_that_model_type(listing, qwen3_excluded):
    by_key = {key(r): r for r in listing}
    excluded = select(qwen3_excluded, lambda r: r["status"] == "excluded")
    assert [r["class"] for r in excluded] == ["Qwen3RotaryEmbedding"]
    assert "ROPE_PATCH_EXCLUDE" in excluded[0]["reason"]
    for row in qwen3_excluded:  # qwen3_moe, qwen3_next...: as without the variable
        if row["model_type"] != "qwen3":
            assert row == by_key[key(row)]


def test_exclude_variable_takes_class_names():
    rows = list_json("*llama*", ROPE_PATCH_EXCLUDE="LlamaRotaryEmbedding")
    excluded = {r["class"] for r in rows if r["status"] == "excluded"}
    assert excluded == {"LlamaRotaryEmbedding"}


def test_exclude_variable_and_list_take_the_same_globs(listing):
    """``qwen3*`` in ROPE_PATCH_EXCLUDE excludes exactly what ``list qwen3*`` lists."""
    rows = list_json("qwen3*", ROPE_PATCH_EXCLUDE="qwen3*")
    assert rows and {r["status"] for r in rows} == {"excluded"}
    assert [key(r) for r in rows] == [key(r) for r in select(listing, lambda r: r["model_type"].startswith("qwen3"))]


def test_verify_proves_cached_llama_classes():
    result = invoke("list", "*llama*", "--verify", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    verified = [r["class"] for r in rows if r.get("check") == "identical"]
    assert "LlamaRotaryEmbedding" in verified
    assert not [r for r in rows if r["status"] == "cached" and r.get("check") != "identical"]


def test_verify_exits_1_and_names_a_mismatch(monkeypatch):
    """A mismatch reported by verify_class becomes the row's CHECK and the
    exit code (verify_class is replaced so the runtime need not be broken)."""
    from rope_patch.diagnostics import verify
    from rope_patch.status import Status

    def mismatching(rotary, device="cpu", dtypes=(), cases="all"):
        return verify.ClassOutcome(rotary, Status.CACHED, "", problems=("decode 1x1: values differ",))

    monkeypatch.setattr(verify, "verify_class", mismatching)
    result = invoke("list", "--verify", "LlamaRotaryEmbedding")
    assert result.exit_code == 1, result.output
    assert "MISMATCH" in result.stdout and "decode 1x1: values differ" in result.stdout


def test_list_agrees_with_import_rope_patch_auto_in_a_child(listing, qwen3_excluded):
    """For classes of every status, ``list --json`` says cached or fallback
    exactly when ``import rope_patch.auto`` wraps the class's forward in a
    fresh interpreter, with and without ROPE_PATCH_EXCLUDE."""
    picks = {}
    for status in ("cached", "fallback", "unsupported"):
        for row in [r for r in listing if r["status"] == status][:2]:
            picks[key(row)] = row
    for row in listing:
        if row["class"] in ("LlamaRotaryEmbedding", "Gemma3RotaryEmbedding", "Qwen3RotaryEmbedding"):
            picks[key(row)] = row
    cases = [(list(picks.values()), {}), (qwen3_excluded, {"ROPE_PATCH_EXCLUDE": "qwen3"})]
    code = textwrap.dedent(
        """
        import importlib, json, sys
        import rope_patch.auto
        from rope_patch.forward import original_of
        rows = json.loads(sys.argv[1])
        print(json.dumps([
            original_of(getattr(getattr(importlib.import_module(m), c), "forward")) is not None for m, c in rows
        ]))
        """
    )
    for rows, env in cases:
        child = subprocess.run(
            [sys.executable, "-c", code, json.dumps([key(r) for r in rows])],
            check=False,
            capture_output=True,
            text=True,
            env=subprocess_env(**env),
            timeout=300,
        )
        assert child.returncode == 0, child.stderr
        wrapped = json.loads(child.stdout.strip().splitlines()[-1])
        listed = [r["status"] in ("cached", "fallback") for r in rows]
        assert dict(zip([r["class"] for r in rows], wrapped)) == dict(zip([r["class"] for r in rows], listed)), env
        assert any(wrapped) and not all(wrapped)


# --------------------------------------------------------------------------
# info, --version, bench


def test_info_shows_versions_ranges_and_variables():
    result = invoke("info", ROPE_PATCH_EXCLUDE="qwen3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"rope-patch {rope_patch.__version__}" in out
    for package in ("torch", "transformers", "wrapt"):
        assert versions.installed(package) in out
    for low, high in versions.SUPPORTED.values():
        assert f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}" in out
    for name in ROPE_VARIABLES:
        assert name in out
    assert "'qwen3'" in out and "environment parses: yes" in out


def test_info_reports_an_unparseable_environment_and_unknown_variables():
    result = invoke("info", ROPE_PATCH_DISABLE="maybe", ROPE_PATCH_TYPO="1")
    assert result.exit_code == 0, result.output
    assert "environment parses: no" in result.stdout and "ROPE_PATCH_DISABLE='maybe'" in result.stdout
    assert re.search(r"ROPE_PATCH_TYPO\s+'1'\s+unknown variable", result.stdout)


def test_info_and_version_import_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from rope_patch.cli import main\n"
        "for args in (['info'], ['--version']):\n"
        "    try:\n"
        "        main(args, prog_name='rope-patch')\n"
        "    except SystemExit as exit:\n"
        "        assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip().splitlines()[-1] == "[]"


def test_version_names_rope_patch_torch_transformers_wrapt():
    result = invoke("--version")
    assert result.exit_code == 0
    line = result.stdout.strip()
    assert line.startswith(f"rope-patch {rope_patch.__version__} (")
    for package in ("torch", "transformers", "wrapt"):
        assert f"{package} {versions.installed(package)}" in line


def test_bench_prints_one_row_per_shape():
    result = invoke("bench", "--shapes", "1x1,2x3", "--repeats", "3", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    rows = [line.split() for line in lines if re.match(r"^\d+x\d+ ", line)]
    assert [row[0] for row in rows] == ["1x1", "2x3"], result.stdout
    for row in rows:
        unpatched, patched, floor = (float(cell) for cell in row[1:4])
        assert unpatched > 0 and patched > 0 and floor > 0
        assert row[4].endswith("x")
        assert float(row[4][:-1]) == pytest.approx(unpatched / patched, rel=0.05, abs=0.01)


# --------------------------------------------------------------------------
# Bad options: a usage error (exit 2) naming the problem, no traceback


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["list", "--status", "bogus"], "'bogus' is not one of"),
        (["list", "--dtype", "float16"], "--verify"),
        (["list", "--verify", "--dtype", "int8"], "'int8' is not one of"),
        (["list", "--verify", "--device", "tpu"], "'tpu' is not one of"),
        (["bench", "--shapes", "1y2"], "'1y2' is not BATCHxSEQ"),
        (["bench", "--shapes", "0x4"], "must be positive"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--model-type", "gpt2"], "'gpt2' is not one of"),
        (["bench", "--dtype", "double"], "'double' is not one of"),
        (["run"], "Missing argument 'PROGRAM'"),
        (["run", "--exclude", "bad name!", "--", "python"], "is not a model type, class name or glob"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_options_are_usage_errors(args, named):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and named in result.stderr, result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------
# run (subprocesses: it execs the program)

RUN_CHILD = """
import json, os, sys
import usermodule  # importable only through the user's PYTHONPATH
from transformers.models.llama import modeling_llama
from rope_patch.forward import original_of
print(json.dumps({
    "wrapped": original_of(modeling_llama.LlamaRotaryEmbedding.forward) is not None,
    "user_sitecustomize": getattr(sys, "user_sitecustomize_ran", False),
    "sitecustomize": sys.modules["sitecustomize"].__file__,
    "pythonpath": os.environ["PYTHONPATH"],
    "exclude": os.environ.get("ROPE_PATCH_EXCLUDE"),
}))
sys.exit(3)
"""


@pytest.fixture
def user_program(tmp_path):
    """A program, a module only the user's PYTHONPATH provides, and the
    user's own sitecustomize."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "usermodule.py").write_text("")
    # It marks the interpreter it runs in (not the environment, which the
    # child would inherit from a parent that ran it).
    (user / "sitecustomize.py").write_text("import sys\nsys.user_sitecustomize_ran = True\n")
    script = tmp_path / "program.py"
    script.write_text(RUN_CHILD)
    pythonpath = os.pathsep.join([ROOT, str(user)])
    return script, str(user), pythonpath


def run_cli(args, pythonpath, **env):
    environment = subprocess_env(**env)
    environment["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-m", "rope_patch.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_run_activates_the_patch_and_keeps_the_users_setup(user_program):
    script, user, pythonpath = user_program
    result = run_cli(["run", "--", sys.executable, str(script)], pythonpath)
    assert result.returncode == 3, result.stderr  # the program's exit status, passed through
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["wrapped"] is True
    assert report["user_sitecustomize"] is True
    assert report["sitecustomize"] == os.path.join(user, "sitecustomize.py")
    assert report["pythonpath"] == os.pathsep.join([BOOTSTRAP_DIR, pythonpath])
    assert report["exclude"] is None


def test_run_exclude_is_merged_into_the_variable(user_program):
    script, _, pythonpath = user_program
    result = run_cli(
        ["run", "--exclude", "llama", "--", sys.executable, str(script)], pythonpath, ROPE_PATCH_EXCLUDE="qwen3"
    )
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["wrapped"] is False
    assert report["exclude"] == "qwen3,llama"


def test_run_without_rope_patch_run_is_unpatched(user_program):
    """The same program run directly: not wrapped (so the test above can fail)."""
    script, _, pythonpath = user_program
    environment = subprocess_env()
    environment["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["wrapped"] is False


def test_run_missing_program_exits_127():
    result = run_cli(["run", "--", "/nonexistent/program"], ROOT)
    assert result.returncode == 127
    assert "/nonexistent/program" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------
# examples


def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
        check=False,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "tokens identical: True" in result.stdout
    assert "Qwen3RotaryEmbedding: cached" in result.stdout
    assert re.search(r"unpatched: [\d.]+ ms/token", result.stdout)
    assert re.search(r"patched: +[\d.]+ ms/token", result.stdout)


# --------------------------------------------------------------------------
# check


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Folders with only a config.json: a tiny Qwen3, a Llama with dynamic
    NTK RoPE, and a Qwen2-VL (a multimodal config with a text sub-config)."""
    import transformers

    from tests.models import TINY

    root = tmp_path_factory.mktemp("models")
    configs = {
        "qwen3": transformers.Qwen3Config(**dict(TINY, head_dim=16)),
        "llama_dynamic": transformers.LlamaConfig(**dict(TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    }
    for name, config in configs.items():
        config.save_pretrained(root / name)
    return root


def test_check_a_model_folder_proves_identity_and_times_it(model_folders):
    result = invoke("check", str(model_folders / "qwen3"), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{model_folders / 'qwen3'}: model type qwen3")
    assert "Qwen3RotaryEmbedding, rope type default: cached" in result.stdout
    assert "bit-identical to the unpatched forward" in result.stdout
    timed = [line for line in lines if line.strip().startswith("per call")]
    assert [line.split()[2] for line in timed] == ["1x1:", "1x512:"] and all(line.endswith("x") for line in timed)
    assert lines[-1] == "verdict: 1 of 1 rotary classes answered from tables"


def test_check_a_config_json_with_a_changing_rope_type(model_folders):
    rows = json.loads(
        invoke("check", str(model_folders / "llama_dynamic" / "config.json"), "--no-timing", "--json").stdout
    )
    (row,) = [r for r in rows["rotaries"] if r["name"] == "LlamaRotaryEmbedding"]
    assert row["rope_type"] == "dynamic" and row["status"] == "cached" and row["identical"] is True


def test_check_reports_bad_paths():
    result = invoke("check", "/no/such/model")
    assert result.exit_code == 2 and "no such file or folder" in result.stderr


def hub_cache(root, repo_id: str, config) -> tuple[str, str]:
    """Lay out a Hugging Face cache under ``root`` (HF_HOME) holding only
    ``repo_id``'s config.json, as a download would leave it; returns
    (HF_HOME, the snapshot's commit id)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    config.save_pretrained(repo / "snapshots" / commit)
    return str(root), commit


def check_offline(hf_home, *args):
    """``rope-patch check ARGS`` in a child process with the Hub offline
    (its switch is read when huggingface_hub is imported)."""
    env = subprocess_env(HF_HOME=hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-m", "rope_patch", "check", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    import transformers

    from tests.models import TINY

    return hub_cache(tmp_path_factory.mktemp("hf_home"), "tiny-org/tiny-qwen3", transformers.Qwen3Config(**TINY))


def test_check_a_hub_model_id_from_the_local_cache_offline(offline_hub):
    hf_home, commit = offline_hub
    for revision in ((), ("--revision", commit)):
        result = check_offline(hf_home, "tiny-org/tiny-qwen3", *revision, "--no-timing", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["model_type"] == "qwen3"
        assert [(r["name"], r["status"], r["identical"]) for r in report["rotaries"]] == [
            ("Qwen3RotaryEmbedding", "cached", True)
        ]


def test_a_hub_model_id_that_cannot_be_had_offline_is_named_with_the_reason(offline_hub):
    hf_home, _ = offline_hub
    result = check_offline(hf_home, "tiny-org/not-downloaded", "--no-timing")
    assert result.returncode == 2, result.stdout
    assert "tiny-org/not-downloaded: not a local path" in result.stderr
    assert "not in the local Hugging Face cache while offline" in result.stderr
    result = check_offline(hf_home, "tiny-org/tiny-qwen3", "--revision", "v9", "--no-timing")
    assert result.returncode == 2 and "at revision v9" in result.stderr, result.stderr


def test_revision_is_for_hub_ids(model_folders):
    result = invoke("check", str(model_folders / "qwen3"), "--revision", "main")
    assert result.exit_code == 2 and "--revision is for Hub model ids" in result.stderr


def test_a_model_type_mapped_to_several_classes_has_a_model_class():
    # transformers maps funnel to (FunnelModel, FunnelBaseModel): a tuple of names, not one.
    import transformers

    from rope_patch.diagnostics.skeleton import ModelSource, model_class

    assert model_class(transformers.FunnelConfig(), ModelSource("unused"), False) is transformers.FunnelModel
