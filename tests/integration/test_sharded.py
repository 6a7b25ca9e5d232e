"""Sharded snapshots under torchrun on gloo: DDP with shard_replicated (each of 2 replicas snapshots half of the
parameters and optimizer state; restore gathers them) and FSDP2 (each rank snapshots its local shards). One rank
is SIGKILLed mid-run, torchrun restarts all of them, and every rank ends bit for bit like a failure-free run
(started beside it, without ftd). dp=3 and uneven splits are covered by tests/unit/test_sharding.py."""

from __future__ import annotations

import random
import signal

import pytest

from ftd.demo.cluster import LocalNode, Reference
from ftd.demo.model import TinyGPT
from ftd.demo.procs import read_losses, wait_for_step
from ftd.manifest import Manifest

from tests.bitexact import differing
from tests.integration.cluster import STEPS, TRAIN_ARGS, restores

CASES = {"ddp-shard-replicated-2": (2, ["--shard-replicated"]), "fsdp2-2": (2, ["--fsdp"])}


def newest_manifest(node: LocalNode, rank: int) -> Manifest:
    found = [Manifest.from_json(p.read_bytes()) for p in node.shm.glob(f"ftd-*/rank-{rank}/*.manifest.json")]
    assert found, f"no sealed snapshot of rank {rank}"
    return max(found, key=lambda m: m.step)


def state_bytes(manifest: Manifest) -> int:
    """Bytes of parameters and optimizer state this rank's snapshot holds."""
    return sum(e.nbytes for e in manifest.entries if e.kind in ("param", "optim"))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.timeout(120 + 180 + 180 + 60)  # the budgets below
def test_sharded_rank_killed_resumes_bit_exact(node: LocalNode, case: str, tmp_path_factory: pytest.TempPathFactory):
    ranks, flags = CASES[case]
    # the failure-free run without ftd, started beside the test's own run
    reference = Reference(tmp_path_factory.mktemp("reference"), ranks, [*TRAIN_ARGS, *flags]).start()
    node.trainers.extend(reference.procs)
    kill_at = random.Random().randrange(3, STEPS - 4)
    agent = node.torchrun(ranks, [*TRAIN_ARGS, "--step-sleep", "0.05", *flags])
    wait_for_step(node.losses, kill_at, agent, timeout=120, rank=1)
    node.worker_of_rank(1).send_signal(signal.SIGKILL)
    assert agent.wait(180) == 0, node.log.read_text()[-4000:]
    reference.wait(180)

    resumed = {}
    for rank in range(ranks):
        resumed[rank] = [r for r in restores(node, rank) if r["restored_step"]]
        assert resumed[rank], f"rank {rank} did not resume (killed at {kill_at}): {restores(node, rank)}"
        ref_losses = reference.rank_losses(rank)
        assert len(ref_losses) == STEPS and read_losses(node.losses, rank) == ref_losses, f"rank {rank} losses differ"
        ref, got = reference.params(rank), node.params(rank)
        assert ref.keys() == got.keys()
        assert not differing(got, ref), differing(got, ref)

    # Each rank's snapshot holds about 1/ranks of the parameters + AdamW state, and together exactly all of it.
    model = TinyGPT()
    params = list(model.parameters())
    full = 4 * (3 * sum(p.numel() for p in params) + len(params))  # fp32 params, exp_avg, exp_avg_sq; a step each
    manifests = [newest_manifest(node, rank) for rank in range(ranks)]
    assert {m.step for m in manifests} == {STEPS}
    held = [state_bytes(m) for m in manifests]
    if "--shard-replicated" in flags:
        assert all(resumed[r][-1]["restore_gathered"] for r in range(ranks)), "the restore did not gather the shards"
        assert all(m.meta["sharding"]["dp"] == ranks for m in manifests)
        assert sum(held) == full, (held, full)
    else:  # FSDP: the per-parameter step counters are plain tensors on every rank, the rest are local shards
        assert not any(resumed[r][-1]["restore_gathered"] for r in range(ranks))
        assert sum(held) == full + (ranks - 1) * 4 * len(params), (held, full)
        assert all(m.meta["dtensors"] for m in manifests)
    assert all(0.9 * full / ranks < h < 1.1 * full / ranks for h in held), (held, full)
