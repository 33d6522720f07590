"""Two-process DDP on CPU (gloo) through torchrun: the per-step losses are
bit-identical with the patch active in every rank, whether each rank imports
rope_patch.auto or the job runs under ``rope-patch run``."""

import json
import os
import subprocess
import sys

from tests.conftest import subprocess_env

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_job(tmp_path, name, prefix=(), **env):
    out = tmp_path / f"{name}.json"
    result = subprocess.run(  # the return code is checked below
        [*prefix, *TORCHRUN, WORKER, str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=subprocess_env(OMP_NUM_THREADS="1", **env),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_losses_identical_with_the_patch_in_every_rank(tmp_path):
    reference = run_job(tmp_path, "unpatched")
    assert reference["patched"] == [0, 0]
    via_import = run_job(tmp_path, "auto", ROPE_TEST_IMPORT_AUTO="1")
    assert via_import["patched"] == [1, 1]
    assert via_import["losses"] == reference["losses"]
    cli = [sys.executable, "-m", "rope_patch.cli", "run", "--"]
    via_cli = run_job(tmp_path, "cli", prefix=cli)
    assert via_cli["patched"] == [1, 1]
    assert via_cli["losses"] == reference["losses"]
