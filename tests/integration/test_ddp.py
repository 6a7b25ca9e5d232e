"""Two DDP ranks on gloo under torchrun: one rank SIGKILLed, torchrun restarts both, and the run ends
bit for bit like an uninterrupted one (every rank's losses and parameters)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from ftd.demo.procs import ftd_env, read_losses, wait_for_step

from tests.bitexact import differing
from tests.integration.cluster import STEPS, Cluster

RANKS = 2


def torchrun(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={RANKS}", "--max-restarts=2", "-m", "ftd.demo.train", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def worker_of_rank(agent: subprocess.Popen[bytes], rank: int) -> psutil.Process:
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if "ftd.demo.train" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent.pid}")


@pytest.fixture(scope="module", params=[[], ["--zero"]], ids=["adamw", "zero-sharded-adamw"])
def ddp_reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("ddp-reference")
    agent = torchrun(["--steps", str(STEPS), "--no-ftd", "--losses", str(root / "losses.jsonl"),
                      "--out", str(root / "params-{rank}.pt"), *request.param], ftd_env(root, "ref"),
                     root / "train.log")
    assert agent.wait(150) == 0, (root / "train.log").read_text()[-4000:]
    return root, request.param


@pytest.mark.timeout(150 + 120 + 180 + 60)  # the budgets below, the module's reference run included
def test_ddp_rank_killed_resumes_bit_exact(node: Cluster, ddp_reference: tuple[Path, list[str]]):
    """Plain AdamW, and ZeroRedundancyOptimizer (each rank snapshots only its optimizer partition)."""
    ddp_reference, extra = ddp_reference
    kill_at = random.Random().randrange(3, STEPS - 4)
    agent = torchrun(["--steps", str(STEPS), "--step-sleep", "0.1", "--losses", str(node.losses),
                      "--out", str(node.root / "params-{rank}.pt"), *extra], node.env, node.log)
    node.procs.append(agent)
    wait_for_step(node.losses, kill_at, agent, timeout=120, rank=1)
    worker_of_rank(agent, 1).send_signal(signal.SIGKILL)
    assert agent.wait(180) == 0, node.log.read_text()[-4000:]

    log = node.log.read_text()
    for rank in range(RANKS):
        assert f"rank {rank} resumed at step" in log, f"rank {rank} did not resume (killed at {kill_at}):\n{log[-3000:]}"
        ref_losses = read_losses(ddp_reference / "losses.jsonl", rank)
        assert len(ref_losses) == STEPS and read_losses(node.losses, rank) == ref_losses, f"rank {rank} losses differ"
        ref = torch.load(ddp_reference / f"params-{rank}.pt", weights_only=True)
        got = torch.load(node.root / f"params-{rank}.pt", weights_only=True)
        assert not differing(got, ref), differing(got, ref)
