"""Three simulated nodes under real elastic torchrun (c10d rendezvous on a store outside the nodes).
One node is lost whole — agent, worker, daemon and memory — and replaced by a new agent + daemon with
the same node identity. torchrun reassigns ranks; every rank finds its snapshot wherever the group
holds it (rebuilt by erasure coding or fetched from the peer that has it) and the run ends bit-exact."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from ftd.demo.cluster import RendezvousStore, all_losses, kill_tree
from ftd.demo.procs import ftd_env, free_port, start_trainer

from tests.bitexact import differing
from tests.integration.multinode import make_nodes, wait_protected

STEPS = 24
NODES = 3
TRAIN = ["--steps", str(STEPS), "--step-sleep", "0.25"]


@pytest.mark.timeout(180 + 200 + 240 + 60)  # the budgets below
def test_node_replaced_under_torchrun_ranks_reassigned_bit_exact(tmp_path: Path):
    ref_root = tmp_path / "reference"
    ref_root.mkdir()
    master = free_port()
    refs = []
    for rank in range(NODES):
        env = dict(ftd_env(ref_root, "ref"), RANK=str(rank), WORLD_SIZE=str(NODES), LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
        refs.append(start_trainer(["--steps", str(STEPS), "--no-ftd", "--losses", str(ref_root / f"l{rank}.jsonl"),
                                   "--out", str(ref_root / "p-{rank}.pt")], env, ref_root / "train.log"))
    assert all(p.wait(180) == 0 for p in refs), (ref_root / "train.log").read_text()[-3000:]
    reference = all_losses([ref_root / f"l{r}.jsonl" for r in range(NODES)])

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    nodes = make_nodes(cluster, NODES, "2+1")
    store = RendezvousStore(timeout_s=120)
    try:
        for node in nodes:
            node.start_daemon()
        agents = [node.agent(store.port, NODES, TRAIN, "elastic", max_restarts=3) for node in nodes]
        deadline = time.monotonic() + 200
        while max((s for (_, s) in all_losses([n.losses for n in nodes])), default=-1) < 8:
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), nodes[0].log.read_text()[-3000:]
            time.sleep(0.1)
        wait_protected(nodes, 4)
        victim = nodes[0]
        kill_tree(agents[0].pid)  # the agent and its worker (torchrun starts workers in their own session)
        victim.lose_everything()
        victim.start_daemon()
        victim.agent(store.port, NODES, TRAIN, "elastic", max_restarts=3)
        for agent in [*agents[1:], victim.trainers[-1]]:
            assert agent.wait(240) == 0, "\n".join(n.log.read_text()[-2000:] for n in nodes)
    finally:
        for node in nodes:
            node.close()
        store.stop()

    logs = "\n".join(n.log.read_text() for n in nodes)
    assert "rebuilt node 0 step" in victim.daemon_log.read_text()
    resumed = re.findall(r"rank (\d+) resumed at step (\d+)", logs)
    assert sorted(int(r) for r, _ in resumed[-NODES:]) == list(range(NODES)), logs[-3000:]
    assert len({s for _, s in resumed[-NODES:]}) == 1, f"ranks resumed at different steps: {resumed}"
    got = all_losses([n.losses for n in nodes])
    assert set(got) == set(reference)
    diverged = sorted(k for k in got if got[k] != reference[k])
    assert not diverged, f"losses differ at (rank, step) {diverged[:5]}: {got[diverged[0]]} vs {reference[diverged[0]]}"
    want = torch.load(ref_root / "p-0.pt", weights_only=True)
    for path in cluster.glob("node*/params-*.pt"):
        params = torch.load(path, weights_only=True)
        assert not differing(params, want), f"{path} differs in {differing(params, want)}"
