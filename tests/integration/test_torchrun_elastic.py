"""Three simulated nodes under real elastic torchrun (c10d rendezvous on a store outside the nodes).
One node is lost whole — agent, worker, daemon and memory — and replaced by a new agent + daemon with
the same node identity. torchrun reassigns ranks; every rank finds its snapshot wherever the group
holds it (rebuilt by erasure coding or fetched from the peer that has it) and the run ends bit-exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ftd.demo import results
from ftd.demo.cluster import Reference, RendezvousStore, all_losses, kill_tree

from tests.bitexact import differing
from tests.integration.cluster import make_nodes, wait_protected

STEPS = 24
NODES = 3
TRAIN = ["--steps", str(STEPS), "--step-sleep", "0.25"]


@pytest.mark.long  # the suite's time budget; `ftd demo`'s node loss (tests/integration/test_demo_and_chaos.py) covers it
@pytest.mark.timeout(180 + 200 + 240 + 60)  # the budgets below
def test_node_replaced_under_torchrun_ranks_reassigned_bit_exact(tmp_path: Path):
    reference = Reference(tmp_path / "reference", NODES, ["--steps", str(STEPS)]).start().wait(180)

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
        scrape = victim.metrics()  # the replacement daemon, after every rank finished
        rebuilt_step, rebuilds = scrape.value("ftd_rebuilt_step"), scrape.by_label("ftd_rebuilds_total", "outcome")
    finally:
        for node in nodes:
            node.close()
        store.stop()

    assert rebuilds.get("rebuilt", 0) >= 1 and rebuilt_step >= 4, (rebuilds, rebuilt_step)
    done = results.latest([r for n in nodes for r in n.results()], "done")
    assert sorted(done) == list(range(NODES)), done
    resumed = {rank: record["restored_step"] for rank, record in done.items()}
    assert len(set(resumed.values())) == 1 and min(resumed.values()) > 0, f"ranks resumed at {resumed}"
    got = all_losses([n.losses for n in nodes])
    want = reference.losses
    assert set(got) == set(want)
    diverged = sorted(k for k in got if got[k] != want[k])
    assert not diverged, f"losses differ at (rank, step) {diverged[:5]}: {got[diverged[0]]} vs {want[diverged[0]]}"
    for path in cluster.glob("node*/params-*.pt"):
        params, ref = torch.load(path, weights_only=True), reference.params(int(path.stem.rsplit("-", 1)[1]))
        assert not differing(params, ref), f"{path} differs in {differing(params, ref)}"
