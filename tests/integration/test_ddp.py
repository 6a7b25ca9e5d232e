"""Two DDP ranks on gloo under torchrun: one rank SIGKILLed, torchrun restarts both, and the run ends
bit for bit like an uninterrupted one (every rank's losses and parameters)."""

from __future__ import annotations

import random
import signal

import pytest

from ftd.demo.cluster import LocalNode, Reference
from ftd.demo.procs import read_losses, wait_for_step

from tests.bitexact import differing
from tests.integration.cluster import STEPS, TRAIN_ARGS, restores

RANKS = 2


@pytest.fixture(scope="module", params=[[], ["--zero"]], ids=["adamw", "zero-sharded-adamw"])
def ddp_reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Reference, list[str]]:
    root = tmp_path_factory.mktemp("ddp-reference")
    return Reference(root, RANKS, [*TRAIN_ARGS, *request.param]).start().wait(150), request.param


@pytest.mark.timeout(150 + 120 + 180 + 60)  # the budgets below, the module's reference run included
def test_ddp_rank_killed_resumes_bit_exact(node: LocalNode, ddp_reference: tuple[Reference, list[str]]):
    """Plain AdamW, and ZeroRedundancyOptimizer (each rank snapshots only its optimizer partition)."""
    reference, extra = ddp_reference
    kill_at = random.Random().randrange(3, STEPS - 4)
    agent = node.torchrun(RANKS, [*TRAIN_ARGS, "--step-sleep", "0.1", *extra])
    wait_for_step(node.losses, kill_at, agent, timeout=120, rank=1)
    node.worker_of_rank(1).send_signal(signal.SIGKILL)
    assert agent.wait(180) == 0, node.log.read_text()[-4000:]

    for rank in range(RANKS):
        resumed = [r["restored_step"] for r in restores(node, rank) if r["restored_step"]]
        assert resumed, f"rank {rank} did not resume (killed at {kill_at}): {restores(node, rank)}"
        ref_losses = reference.rank_losses(rank)
        assert len(ref_losses) == STEPS and read_losses(node.losses, rank) == ref_losses, f"rank {rank} losses differ"
        got, ref = node.params(rank), reference.params(rank)
        assert not differing(got, ref), differing(got, ref)
