"""The scripts in examples/ run under torchrun as README documents, and resume from the daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _torchrun(node: Cluster, script: str, steps: int) -> str:
    # --standalone draws a new run id per launch; continuing a finished run is asked for by naming the run
    env = dict(node.env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", FTD_RUN="examples")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--max-restarts=1", str(EXAMPLES / script), "--steps", str(steps)], env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("script", ["ddp_gpt.py", "zero_gpt.py"])
@pytest.mark.timeout(2 * 200 + 40)  # two launches
def test_example_snapshots_and_resumes(node: Cluster, script: str):
    first = _torchrun(node, script, 6)
    assert "done at step 6 (started at 0)" in first
    second = _torchrun(node, script, 10)
    assert "done at step 10 (started at 6)" in second, second[-3000:]
