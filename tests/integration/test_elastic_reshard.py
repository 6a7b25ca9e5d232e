"""Elastic resharding from memory under real torchrun: 4 loopback nodes, EC 3+1, `--nnodes=3:4`.

One node is lost whole (agent, worker, daemon, memory) and **not** replaced, with no durable tier:
torchrun re-forms the job on 3 nodes and every new rank reshards the old world's newest protected
step from memory — the lost node's ranks decoded by one survivor. Later the node comes back and the
job grows to 4 again, resharding the 3-rank world's newest step. Each time every new rank saves the
tensors it restored; side by side they equal, byte for byte, the global model and optimizer tensors
of the step the old world had sealed in shared memory. Checksum chunks of 4 KiB here, so the bytes
each rank moved show that no rank gathers the whole state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ftd.demo.cluster import LocalNode, RendezvousStore, all_losses, kill_tree

from tests.bitexact import byte_view
from tests.integration.cluster import make_nodes, sealed_globals, wait_protected

NODES, STEPS = 4, 60
CASES = {"ddp": [], "fsdp2": ["--fsdp"]}
# FSDP2 runs in the default suite (sharded pieces, peers' ranges, the decoded node); DDP, whose survivors read
# only their own node's replica, is in `python -m pytest -m long` (the suite's time budget).
PARAMS = [pytest.param("ddp", marks=pytest.mark.long), "fsdp2"]
RDZV = "last_call_timeout=2"


def _train(node: LocalNode, flags: list[str]) -> list[str]:
    return ["--steps", str(STEPS), "--step-sleep", "0.2", *flags,
            "--save-restored", str(node.root / "restored-{step}-{rank}.pt")]


def _newest_step(nodes: list[LocalNode]) -> int:
    return max((s for (_, s) in all_losses([n.losses for n in nodes])), default=-1)


def _resharded(nodes: list[LocalNode], old_world: int) -> dict[int, dict]:
    """The restore records (by new rank) of the reshard from a world of `old_world`."""
    out = {}
    for n in nodes:
        for r in n.results():
            if r.get("event") == "restore" and r.get("restore_resharded") and r.get("restore_old_world") == old_world:
                out[r["rank"]] = r
    return out


def _wait(what: str, condition, timeout: float, nodes: list[LocalNode]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: " + "\n".join(
            n.log.read_text()[-1500:] for n in nodes)
        time.sleep(0.2)


def _restored(nodes: list[LocalNode], step: int, world: int, fsdp: bool) -> dict[str, torch.Tensor]:
    """The new ranks' restored tensors of `step` side by side (FSDP2: shards along dim 0 in rank order)."""
    per_rank: dict[int, dict[str, torch.Tensor]] = {}
    for n in nodes:
        for path in n.root.glob(f"restored-{step}-*.pt"):
            per_rank[int(path.stem.rsplit("-", 1)[1])] = torch.load(path, weights_only=True)
    assert sorted(per_rank) == list(range(world)), sorted(per_rank)
    out = {}
    for name, first in per_rank[0].items():
        parts = [per_rank[r][name] for r in range(world)]
        if fsdp and first.dim():
            out[name] = torch.cat(parts)
        else:
            for other in parts[1:]:
                assert torch.equal(byte_view(other), byte_view(first)), f"{name}: replicas restored different bytes"
            out[name] = first
    return out


def _assert_same_bytes(restored: dict[str, torch.Tensor], sealed: dict[str, torch.Tensor]) -> None:
    assert set(restored) == set(sealed) and any(k.startswith("optim.state.") for k in sealed), sorted(sealed)[:6]
    for fqn, tensor in sealed.items():
        got = restored[fqn]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, (fqn, got.shape, tensor.shape)
        assert torch.equal(byte_view(got), byte_view(tensor)), f"{fqn} differs from the sealed bytes"


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.timeout(150 + 120 + 150 + 120 + 240 + 60)  # the budgets below
def test_a_lost_node_not_replaced_then_back_reshards_from_memory(tmp_path: Path, case: str):
    flags = CASES[case]
    store = RendezvousStore(timeout_s=120)
    nodes = make_nodes(tmp_path / "cluster", NODES, "3+1", FTD_KEEP="100", FTD_CHUNK_BYTES="4096",
                       FTD_PEER_TIMEOUT="2")
    try:
        for node in nodes:
            node.start_daemon()
        agents = [n.agent(store.port, "3:4", _train(n, flags), "elastic", max_restarts=3, rdzv_conf=RDZV)
                  for n in nodes]
        _wait("step 8 on 4 nodes", lambda: _newest_step(nodes) >= 8, 150, nodes)
        wait_protected(nodes, 4)
        lost = nodes[3]
        kill_tree(agents[3].pid)  # the agent and its worker
        lost.lose_everything()  # the daemon and the memory: no replacement comes
        _wait("the 3 survivors resharding", lambda: len(_resharded(nodes, 4)) == 3, 150, nodes)
        shrink = _resharded(nodes, 4)
        shrunk_at = {r["restored_step"] for r in shrink.values()}
        assert len(shrunk_at) == 1, shrink
        p = shrunk_at.pop()
        _wait("training on 3 nodes", lambda: _newest_step(nodes) >= p + 6, 120, nodes)

        lost.start_daemon()  # the node is back (empty memory): the job grows to 4 again
        lost.agent(store.port, "3:4", _train(lost, flags), "elastic", max_restarts=3, rdzv_conf=RDZV)
        deadline = time.monotonic() + 240  # one budget for the four agents
        for agent in [*agents[:3], lost.trainers[-1]]:
            assert agent.wait(max(1.0, deadline - time.monotonic())) == 0, "\n".join(
                n.log.read_text()[-2000:] for n in nodes)
        grow = _resharded(nodes, 3)
        statuses = [n.status() for n in nodes]
        sealed_p = sealed_globals(nodes, p, world_size=4)
        grown_at = {r["restored_step"] for r in grow.values()}
        assert len(grown_at) == 1 and sorted(grow) == [0, 1, 2, 3], grow
        q = grown_at.pop()
        sealed_q = sealed_globals(nodes, q, world_size=3)
    finally:
        for node in nodes:
            node.close()
        store.stop()

    fsdp = case == "fsdp2"
    assert p >= 4 and q > p
    _assert_same_bytes(_restored(nodes, p, 3, fsdp), sealed_p)
    _assert_same_bytes(_restored(nodes, q, 4, fsdp), sealed_q)

    state = sum(t.numel() * t.element_size() for t in sealed_p.values())
    moved_shrink = {r: rec["restore_moved"] for r, rec in shrink.items()}
    moved_grow = {r: rec["restore_moved"] for r, rec in grow.items()}
    assert sum(m["decoded"] for m in moved_shrink.values()) > 0 or not fsdp, moved_shrink
    if fsdp:  # each rank reads about its share (1/3, 1/4 of the state, rounded out to 4 KiB chunks), never all
        for moved in [*moved_shrink.values(), *moved_grow.values()]:
            assert 0 < moved["local"] + moved["peers"] < 0.6 * state, (moved, state)
        assert any(m["peers"] for m in moved_shrink.values()) and any(m["peers"] for m in moved_grow.values())
    else:  # DDP: every old rank held the whole state; a survivor reads its own node's copy only
        assert all(m["peers"] == 0 and m["local"] >= state for m in moved_shrink.values()), moved_shrink
        assert any(m["peers"] >= state for m in moved_grow.values()), moved_grow  # the node that came back
    reports = {(r.rank, r.old_world_size, r.world_size) for s in statuses for r in s.reshards}
    assert {(r, 3, 4) for r in range(4)} <= reports, reports
