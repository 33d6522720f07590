"""Children started with multiprocessing's *spawn* (and *forkserver*) start
method: a fresh interpreter that does not inherit the parent's patched
classes. transformers 5.25's ``serve`` loads its model in such a child
(``tests/test_serve.py`` proves that case under ``rope-patch run``).

What reaches a spawned child is the environment, and the parent's main
module, which the child runs again as ``__mp_main__`` (without its
``if __name__ == "__main__":`` block). So:

- a program that does ``import rope_patch.auto`` at its top level is patched
  in every spawned child too, whichever way it starts them
  (``multiprocessing``'s spawn context, a spawn-context ``Pool``,
  ``torch.multiprocessing.spawn``, ``ProcessPoolExecutor``);
- an import inside ``if __name__ == "__main__":`` (or from ``python -c``, a
  REPL or a notebook: no main module to run again) patches the parent only:
  its spawned children compute unpatched. That is the documented limit
  (docs/limits.md); ``rope-patch run`` (through the environment) patches them.

Each child builds a small random-weight Llama, runs two forwards and
reports whether rope_patch is active in it and whether its rotary calls were
answered from a table.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import subprocess_env

#: The program: CHILD_REPORTS is filled by one child per launcher. IMPORT is
#: where the program imports rope_patch.auto.
PROGRAM = """
{top}
import json
import os
import sys


def child(path, rank=None):
    import torch
    import transformers

    import rope_patch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.arange(8)[None])
    info = rope_patch.cache_info(model.model.rotary_emb)
    with open(path, "w") as stream:
        json.dump({{"pid": os.getpid(), "patched": rope_patch.is_patched(), "answered": info.answered}}, stream)


def spawned(rank, path):  # torch.multiprocessing.spawn passes the rank first
    child(path)


if __name__ == "__main__":
    {guarded}
    import concurrent.futures
    import multiprocessing

    import torch.multiprocessing

    folder, launchers = sys.argv[1], sys.argv[2].split(",")
    context = multiprocessing.get_context("spawn")
    for launcher in launchers:
        path = os.path.join(folder, launcher + ".json")
        if launcher == "process":
            process = context.Process(target=child, args=(path,))
            process.start()
            process.join()
            assert process.exitcode == 0, process.exitcode
        elif launcher == "forkserver":
            process = multiprocessing.get_context("forkserver").Process(target=child, args=(path,))
            process.start()
            process.join()
            assert process.exitcode == 0, process.exitcode
        elif launcher == "pool":
            with context.Pool(1) as pool:
                pool.apply(child, (path,))
        elif launcher == "executor":
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as executor:
                executor.submit(child, path).result()
        elif launcher == "torch-spawn":
            torch.multiprocessing.spawn(spawned, args=(path,), nprocs=1)
    import rope_patch

    with open(os.path.join(folder, "parent.json"), "w") as stream:
        json.dump({{"pid": os.getpid(), "patched": rope_patch.is_patched()}}, stream)
"""

AUTO = "import rope_patch.auto  # noqa: F401"


def run_program(tmp_path, name, launchers, where, prefix=()):
    """Run the program with rope_patch.auto imported at the top level
    (``where="top"``), inside its main block (``"guarded"``) or not at all
    (``"none"``); returns {launcher or "parent": report}."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        PROGRAM.format(top=AUTO if where == "top" else "", guarded=AUTO if where == "guarded" else "pass")
    )
    folder = tmp_path / name
    folder.mkdir()
    result = subprocess.run(  # the return code is checked below
        [*prefix, sys.executable, str(script), str(folder), ",".join(launchers)],
        check=False,
        capture_output=True,
        text=True,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    assert sorted(reports) == sorted([*launchers, "parent"]), reports
    children = {reports[launcher]["pid"] for launcher in launchers}
    assert reports["parent"]["pid"] not in children, reports  # each ran in a process of its own
    return reports


LAUNCHERS = ["process", "forkserver", "pool", "executor", "torch-spawn"]


def test_top_level_import_patches_every_spawned_child(tmp_path):
    reports = run_program(tmp_path, "top", LAUNCHERS, "top")
    for launcher in LAUNCHERS:
        assert reports[launcher]["patched"] and reports[launcher]["answered"], (launcher, reports)


def test_import_under_main_guard_patches_the_parent_only(tmp_path):
    """The limit: the child never runs the main block, so it is not patched."""
    reports = run_program(tmp_path, "guarded", ["process", "torch-spawn"], "guarded")
    assert reports["parent"]["patched"]
    for launcher in ("process", "torch-spawn"):
        assert not reports[launcher]["patched"] and not reports[launcher]["answered"], (launcher, reports)


def test_rope_patch_run_patches_spawned_children_whatever_the_program_imports(tmp_path):
    cli = [sys.executable, "-m", "rope_patch.cli", "run", "--"]
    reports = run_program(tmp_path, "run", ["process", "torch-spawn"], "none", prefix=cli)
    assert reports["parent"]["patched"]
    for launcher in ("process", "torch-spawn"):
        assert reports[launcher]["patched"] and reports[launcher]["answered"], (launcher, reports)
