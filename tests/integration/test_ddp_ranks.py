"""DDP with 3 and 4 ranks on gloo under torchrun, bit for bit, with no throwaway pass in the script.

From 3 ranks on the ring all-reduce sums in an order that depends on DDP's gradient buckets, which
DDP rebuilds after its first iteration. The demo trainer hands its DDP module to the Snapshotter
(`ddp=`), which records the rebuilt buckets and rebuilds a fresh DDP with them on restore
(ftd.client.ddp). Checked: the run with ftd equals the same script without ftd, and a run with a
rank SIGKILLed (torchrun restarts every rank, which resume from the daemon) equals both.
"""

from __future__ import annotations

import random
import signal

import pytest

from ftd.demo.cluster import LocalNode, Reference
from ftd.demo.procs import read_losses, wait_for_step

from tests.bitexact import differing
from tests.integration.cluster import STEPS, TRAIN_ARGS, restores

BUDGET = {3: 150, 4: 200}  # seconds for one 24-step run on a 2-core machine


@pytest.fixture(scope="module", params=[3, 4], ids=["3-ranks", "4-ranks"])
def plain_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The same script without ftd (and so without anything ftd would need from it)."""
    ranks = request.param
    return Reference(tmp_path_factory.mktemp(f"ddp-{ranks}-plain"), ranks, TRAIN_ARGS).start().wait(BUDGET[ranks])


def _assert_equal(node: LocalNode, plain: Reference) -> None:
    for rank in range(plain.world):
        want = plain.rank_losses(rank)
        got = read_losses(node.losses, rank)
        assert len(want) == STEPS and got == want, f"rank {rank}: losses differ from the script without ftd"
        params, ref = node.params(rank), plain.params(rank)
        assert not differing(params, ref), f"rank {rank}: {differing(params, ref)}"


@pytest.mark.timeout(200 + 200 + 60)  # the plain run (module fixture) and this run
def test_ddp_with_ftd_equals_script_without(node: LocalNode, plain_run: Reference):
    agent = node.torchrun(plain_run.world, TRAIN_ARGS)
    assert agent.wait(BUDGET[plain_run.world]) == 0, node.log.read_text()[-4000:]
    assert not [r for r in restores(node) if r["restored_step"]], "nothing was killed: nothing may be restored"
    _assert_equal(node, plain_run)


@pytest.mark.timeout(200 + 120 + 240 + 60)  # the plain run (module fixture), up to the kill, the rest
def test_ddp_rank_killed_resumes_bit_exact(node: LocalNode, plain_run: Reference):
    ranks = plain_run.world
    kill_at = random.Random().randrange(2, STEPS - 4)
    agent = node.torchrun(ranks, [*TRAIN_ARGS, "--step-sleep", "0.1"])
    wait_for_step(node.losses, kill_at, agent, timeout=120, rank=ranks - 1)
    node.worker_of_rank(ranks - 1).send_signal(signal.SIGKILL)
    assert agent.wait(240) == 0, node.log.read_text()[-4000:]
    for rank in range(ranks):
        resumed = [r["restored_step"] for r in restores(node, rank) if r["restored_step"]]
        assert resumed, f"rank {rank} did not resume (killed at {kill_at}): {restores(node, rank)}"
    _assert_equal(node, plain_run)


@pytest.mark.timeout(200 + 2 * 200 + 60)  # the plain run (module fixture), two launches
def test_ddp_resumed_from_the_first_step_in_a_new_launch(node: LocalNode, plain_run: Reference):
    """The snapshot after step 1 is taken before DDP's own rebuild: it triggers that rebuild to record it."""
    ranks = plain_run.world
    first = node.torchrun(ranks, [*TRAIN_ARGS, "--stop-at", "1"], FTD_RUN="ddp-first-step")
    assert first.wait(BUDGET[ranks]) == 0, node.log.read_text()[-4000:]
    second = node.torchrun(ranks, TRAIN_ARGS, FTD_RUN="ddp-first-step")
    assert second.wait(BUDGET[ranks]) == 0, node.log.read_text()[-4000:]
    for rank in range(ranks):
        assert [r["restored_step"] for r in restores(node, rank)][-1] == 1, restores(node, rank)
    _assert_equal(node, plain_run)
