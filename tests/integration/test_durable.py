"""The durable tier under real elastic torchrun on 3 loopback nodes (DDP, and FSDP2 on gloo).

The job persists every 4 steps and stops after step 8. Then every daemon is SIGKILLed and every
node's memory wiped; the relaunched job (new daemons, new agents) resumes from durable step 8 and
ends bit for bit like an uninterrupted run without ftd. In the FSDP2 case, a separate script with
no ftd import then loads step 8 with stock torch.distributed.checkpoint onto 2 ranks, and every
global model and optimizer tensor equals, byte for byte, what the ranks had sealed in shared
memory; and 2 ranks with empty memory restore the last durable step through ftd (resharded from
3 ranks) and hold exactly the sealed parameters."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftd.demo import results
from ftd.demo.cluster import LocalNode, Reference, RendezvousStore, all_losses, single_node
from ftd.durable import layout, reader

from tests.bitexact import byte_view, differing
from tests.integration.cluster import make_nodes, sealed_globals

NODES, STEPS, EVERY, STOP = 3, 16, 4, 8
CASES = {"ddp": [], "fsdp2": ["--fsdp"]}
SCRIPT = Path(__file__).with_name("dcp_load_durable.py")


def _wait_committed(root: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while step not in reader.committed_steps(root):
        assert time.monotonic() < deadline, f"step {step} never became durable: {reader.committed_steps(root)}"
        time.sleep(0.1)


def _agents(nodes: list[LocalNode], store: RendezvousStore, rdzv: str, args: list[str]) -> None:
    agents = [node.agent(store.port, NODES, args, rdzv, max_restarts=0) for node in nodes]
    for agent in agents:
        assert agent.wait(150) == 0, "\n".join(n.log.read_text()[-2000:] for n in nodes)


# FSDP2 in the default suite; DDP (the same path with replicated pieces) in `-m long` for the suite's time budget.
@pytest.mark.parametrize("case", [pytest.param("ddp", marks=pytest.mark.long), "fsdp2"])
@pytest.mark.timeout(180 + 150 + 60 + 150 + 60 + 120 + 120 + 30 + 150)  # the budgets below
def test_every_node_wiped_resumes_from_the_durable_tier_bit_exact(tmp_path: Path, case: str):
    flags = CASES[case]
    # Every port is bound before the next one is picked (a port picked free stays free only until bound).
    store = RendezvousStore(timeout_s=120)
    durable = tmp_path / "durable"
    nodes = make_nodes(tmp_path / "cluster", NODES, "2+1", FTD_PEERS="", FTD_DURABLE_DIR=str(durable),
                       FTD_DURABLE_EVERY=str(EVERY), FTD_DURABLE_KEEP="10")
    root = layout.job_dir(durable, "ectest")
    reference = None
    try:
        for node in nodes:
            node.start_daemon()
        reference = Reference(tmp_path / "reference", NODES, ["--steps", str(STEPS), *flags]).start()
        _agents(nodes, store, "first", ["--steps", str(STEPS), "--stop-at", str(STOP), *flags])
        _wait_committed(root, STOP)
        assert reader.committed_steps(root) == [EVERY, STOP]
        assert all(node.status().durable_step == STOP for node in nodes)
        sealed = sealed_globals(nodes, STOP)

        for node in nodes:  # every daemon and every byte of memory: only the durable tier is left
            node.lose_everything()
            assert not node.shm.exists()
        for node in nodes:
            node.start_daemon()
        _agents(nodes, store, "second", ["--steps", str(STEPS), *flags])
        restored = sum(node.metrics().value("ftd_durable_restores_total") for node in nodes)
        if case == "fsdp2":  # the last step too, for the restore onto 2 ranks below
            _wait_committed(root, STEPS)
            final = sealed_globals(nodes, STEPS)
    except BaseException:
        if reference is not None:
            reference.kill()
        raise
    finally:
        for node in nodes:
            node.close()
        store.stop()
    reference.wait(120)

    done = results.latest([r for n in nodes for r in n.results()], "done")
    assert sorted(done) == list(range(NODES)), done
    assert {r["restored_step"] for r in done.values()} == {STOP}, done
    assert {r["restore_source"] for r in done.values()} == {"durable"}, done
    assert restored == NODES
    got, want = all_losses([n.losses for n in nodes]), reference.losses
    assert set(got) == set(want)
    diverged = sorted(k for k in got if got[k] != want[k])
    assert not diverged, f"losses differ at (rank, step) {diverged[:5]}"
    for path in (tmp_path / "cluster").glob("node*/params-*.pt"):
        params, ref = torch.load(path, weights_only=True), reference.params(int(path.stem.rsplit("-", 1)[1]))
        assert not differing(params, ref), f"{path} differs in {differing(params, ref)}"

    if case != "fsdp2":  # DCP's load of replicated copies is covered by tests/unit/test_durable_tier.py
        return
    # Stock DCP, no ftd, onto 2 ranks: the global tensors are the sealed bytes.
    out = tmp_path / "loaded.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           str(layout.step_dir(durable, "ectest", STOP)), str(out)]
    done_load = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                                      "OMP_NUM_THREADS": "1"})
    assert done_load.returncode == 0, done_load.stderr[-3000:]
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(sealed) and any(k.startswith("optim.state.") for k in sealed), sorted(loaded)[:5]
    assert sum(math.prod(t.shape) for k, t in sealed.items() if k.startswith("model.")) > 0
    for fqn, tensor in sealed.items():
        assert loaded[fqn].dtype == tensor.dtype and loaded[fqn].shape == tensor.shape, fqn
        assert torch.equal(byte_view(loaded[fqn]), byte_view(tensor)), f"{fqn} differs from the sealed bytes"

    # Onto another world size: 2 FSDP2 ranks (a fresh node, empty memory) restore the 3 ranks' last durable
    # step, resharded through DCP's load planning; their shards side by side are the sealed bytes.
    two = single_node(tmp_path / "two", "ectest", FTD_DURABLE_DIR=str(durable))
    try:
        two.start_daemon()
        args = ["--steps", str(STEPS), "--stop-at", str(STEPS), *flags]  # restore, train nothing, save the shards
        assert two.torchrun(2, args, max_restarts=0).wait(150) == 0, two.log.read_text()[-3000:]
    finally:
        two.close()
    resharded = results.latest(two.results(), "done")
    assert sorted(resharded) == [0, 1] and all(
        r["restored_step"] == STEPS and r["restore_resharded"] and r["restore_source"] == "durable"
        for r in resharded.values()), resharded
    shards = [two.params(rank) for rank in range(2)]
    assert shards[0].keys() == shards[1].keys() and shards[0]
    for name in shards[0]:
        full = torch.cat([shards[0][name], shards[1][name]]) if shards[0][name].dim() else shards[0][name]
        assert full.shape == final[f"model.{name}"].shape, name
        assert torch.equal(byte_view(full), byte_view(final[f"model.{name}"])), f"{name} differs after resharding"
