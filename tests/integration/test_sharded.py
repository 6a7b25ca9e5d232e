"""Sharded snapshots under torchrun on gloo: DDP with shard_replicated (each of 2 replicas snapshots half of the
parameters and optimizer state; restore gathers them) and FSDP2 (each rank snapshots its local shards). One rank
is SIGKILLed mid-run, torchrun restarts all of them, and every rank ends bit for bit like a failure-free run
(started beside it, without ftd). dp=3 and uneven splits are covered by tests/unit/test_sharding.py."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftd.demo.model import TinyGPT
from ftd.demo.procs import free_port, ftd_env, read_losses, start_trainer, wait_for_step
from ftd.manifest import Manifest

from tests.bitexact import differing
from tests.integration.cluster import STEPS, Cluster
from tests.integration.test_ddp import worker_of_rank

CASES = {"ddp-shard-replicated-2": (2, ["--shard-replicated"]), "fsdp2-2": (2, ["--fsdp"])}


def torchrun(ranks: int, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={ranks}", "--max-restarts=2", "-m", "ftd.demo.train", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def reference_run(ranks: int, flags: list[str], root: Path) -> list[subprocess.Popen[bytes]]:
    """The failure-free run without ftd: the ranks started directly (no agent), beside the test's own run."""
    env = ftd_env(root, "ref", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks))
    args = ["--steps", str(STEPS), "--no-ftd", "--losses", str(root / "losses.jsonl"),
            "--out", str(root / "params-{rank}.pt"), *flags]
    return [start_trainer(args, dict(env, RANK=str(r), LOCAL_RANK=str(r)), root / f"train-{r}.log")
            for r in range(ranks)]


def newest_manifest(node: Cluster, rank: int) -> Manifest:
    found = [Manifest.from_json(p.read_bytes()) for p in node.shm.glob(f"ftd-*/rank-{rank}/*.manifest.json")]
    assert found, f"no sealed snapshot of rank {rank}"
    return max(found, key=lambda m: m.step)


def state_bytes(manifest: Manifest) -> int:
    """Bytes of parameters and optimizer state this rank's snapshot holds."""
    return sum(e.nbytes for e in manifest.entries if e.kind in ("param", "optim"))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.timeout(120 + 180 + 180 + 60)  # the budgets below
def test_sharded_rank_killed_resumes_bit_exact(node: Cluster, case: str, tmp_path_factory: pytest.TempPathFactory):
    ranks, flags = CASES[case]
    reference = tmp_path_factory.mktemp("reference")
    reference_ranks = reference_run(ranks, flags, reference)
    node.procs.extend(reference_ranks)
    kill_at = random.Random().randrange(3, STEPS - 4)
    agent = torchrun(ranks, ["--steps", str(STEPS), "--step-sleep", "0.05", "--losses", str(node.losses),
                             "--out", str(node.root / "params-{rank}.pt"), *flags], node.env, node.log)
    node.procs.append(agent)
    wait_for_step(node.losses, kill_at, agent, timeout=120, rank=1)
    worker_of_rank(agent, 1).send_signal(signal.SIGKILL)
    assert agent.wait(180) == 0, node.log.read_text()[-4000:]
    for r, proc in enumerate(reference_ranks):
        assert proc.wait(180) == 0, (reference / f"train-{r}.log").read_text()[-4000:]

    log = node.log.read_text()
    for rank in range(ranks):
        assert f"rank {rank} resumed at step" in log, \
            f"rank {rank} did not resume (killed at {kill_at}):\n{log[-3000:]}"
        ref_losses = read_losses(reference / "losses.jsonl", rank)
        assert len(ref_losses) == STEPS and read_losses(node.losses, rank) == ref_losses, f"rank {rank} losses differ"
        ref = torch.load(reference / f"params-{rank}.pt", weights_only=True)
        got = torch.load(node.root / f"params-{rank}.pt", weights_only=True)
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
        assert "gathered" in log, "the restore did not gather the shards"
        assert all(m.meta["sharding"]["dp"] == ranks for m in manifests)
        assert sum(held) == full, (held, full)
    else:  # FSDP: the per-parameter step counters are plain tensors on every rank, the rest are local shards
        assert sum(held) == full + (ranks - 1) * 4 * len(params), (held, full)
        assert all(m.meta["dtensors"] for m in manifests)
    assert all(0.9 * full / ranks < h < 1.1 * full / ranks for h in held), (held, full)
