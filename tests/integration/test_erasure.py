"""Erasure coding across daemons on loopback: a node that loses its memory is rebuilt from its peers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ftd.demo.procs import read_losses, wait_for_step
from ftd.client.rpc import DaemonClient

from tests.bitexact import differing
from tests.integration.cluster import Node, free_port, make_nodes, wait_protected

STEPS = 24


@pytest.fixture
def nodes4(tmp_path: Path, request: pytest.FixtureRequest):
    ec, codec, *host = getattr(request, "param", ("3+1", "auto"))
    nodes = make_nodes(tmp_path, 4, ec, *host, FTD_CODEC=codec)
    try:
        for node in nodes:
            node.start_daemon()
        yield nodes
    finally:
        for node in nodes:
            node.close()


def _references(tmp_path: Path, ranks: range) -> dict[int, tuple[dict[int, str], dict[str, torch.Tensor]]]:
    """Uninterrupted runs without ftd, one per rank (ranks differ in their data)."""
    from ftd.demo.procs import ftd_env, start_trainer

    procs = {}
    for rank in ranks:
        root = tmp_path / f"reference-{rank}"
        root.mkdir()
        procs[rank] = (root, start_trainer(["--steps", str(STEPS), "--no-ftd", "--losses", str(root / "l.jsonl"),
                                            "--out", str(root / "p.pt")], dict(ftd_env(root, "ref"), RANK=str(rank)),
                                           root / "train.log"))
    out = {}
    for rank, (root, proc) in procs.items():
        assert proc.wait(180) == 0
        out[rank] = (read_losses(root / "l.jsonl", rank), torch.load(root / "p.pt", weights_only=True))
    return out


def _segment_bytes(node: Node, step: int) -> bytes:
    for manifest in node.shm.glob(f"ftd-*/rank-{node.index}/*.manifest.json"):
        if f'"step":{step},' in manifest.read_text():
            return Path(str(manifest).removesuffix(".manifest.json") + ".seg").read_bytes()
    raise AssertionError(f"node {node.index} holds no sealed step {step}")


@pytest.mark.timeout(180 + 180 + 30 + 200 + 60)  # the budgets below
def test_ddp_node_loss_resumes_bit_exact(nodes4: list[Node], tmp_path: Path):
    """3+1 over 4 nodes, a DDP rank per node: node 2 loses daemon, rank and memory; a replacement
    with the same identity rebuilds from peers; all ranks restart and end bit-exact."""
    ref_root = tmp_path / "reference"
    ref_root.mkdir()
    port = free_port()

    def launch(node: Node, rank: int, master: int, *extra: str, losses: Path | None = None):
        env = {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(master)}
        return node.trainer(["--steps", str(STEPS), *extra], **env)

    ref = [launch(n, n.index, port, "--no-ftd") for n in nodes4]
    assert all(p.wait(180) == 0 for p in ref), nodes4[0].log.read_text()[-3000:]
    ref_losses = {n.index: read_losses(n.losses, n.index) for n in nodes4}
    ref_params = {n.index: torch.load(n.root / f"params-{n.index}.pt", weights_only=True) for n in nodes4}
    for n in nodes4:
        n.losses.unlink()

    port = free_port()
    procs = [launch(n, n.index, port, "--step-sleep", "0.2") for n in nodes4]
    wait_for_step(nodes4[0].losses, STEPS // 2, procs[0], timeout=180, rank=0)
    protected = wait_protected(nodes4, 4)
    nodes4[2].lose_everything()
    for n in nodes4:
        for p in n.trainers:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    nodes4[2].start_daemon()
    port = free_port()
    procs = [launch(n, n.index, port) for n in nodes4]
    assert all(p.wait(200) == 0 for p in procs), nodes4[2].log.read_text()[-3000:]

    daemon_log = nodes4[2].daemon_log.read_text()
    rebuilt = re.findall(r"rebuilt node 2 step (\d+) from peers", daemon_log)
    assert rebuilt and int(rebuilt[0]) >= protected, daemon_log[-3000:]
    for n in nodes4:
        assert f"rank {n.index} resumed at step {rebuilt[0]}" in n.log.read_text()
        assert read_losses(n.losses, n.index) == ref_losses[n.index], f"rank {n.index} losses differ"
        got = torch.load(n.root / f"params-{n.index}.pt", weights_only=True)
        assert not differing(got, ref_params[n.index]), f"rank {n.index}: {differing(got, ref_params[n.index])}"


def test_unauthenticated_peer_cannot_read_or_write(nodes4: list[Node]):
    import grpc

    from ftd._proto import peer_pb2 as pb
    from ftd._proto import peer_pb2_grpc as pb_grpc
    from ftd.daemon import auth
    from ftd.daemon.transport import BulkClient, PeerUnavailable, curve_keys
    from tests.integration.cluster import TOKEN

    procs = [n.trainer(["--steps", str(STEPS), "--stop-at", "4"], RANK=str(n.index)) for n in nodes4]
    assert all(p.wait(120) == 0 for p in procs)
    step = wait_protected(nodes4, 4)
    target = nodes4[0]
    peers = target.env["FTD_PEERS"].split(",")
    channel = grpc.insecure_channel(peers[0])
    stub = pb_grpc.PeerStub(channel)
    request = pb.HeartbeatRequest(inventory=pb.Inventory(job="ectest", node=1))
    method = "/ftd.v1.Peer/Heartbeat"
    body = request.SerializeToString(deterministic=True)
    try:
        for metadata in ([], [(auth.METADATA_KEY, auth.sign("wrong-token", "ectest", 1, method, body))],
                         [(auth.METADATA_KEY, auth.sign(TOKEN, "other-job", 1, method, body))],
                         [(auth.METADATA_KEY, "1:0:deadbeef")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(request, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        good = [(auth.METADATA_KEY, auth.sign(TOKEN, "ectest", 1, method, body))]
        assert stub.Heartbeat(request, metadata=good, timeout=5).inventory.node == 0
    finally:
        channel.close()

    host, port = peers[0].rsplit(":", 1)
    intruder = BulkClient(f"tcp://{host}:{int(port) + 1}", curve_keys("wrong-token"))
    try:
        with pytest.raises(PeerUnavailable):
            intruder.get({"kind": "data", "step": step, "chunk": 0, "C": 1 << 20}, 0, 4096, timeout=2)
        with pytest.raises(PeerUnavailable):
            intruder.put({"kind": "parity", "step": step + 1, "rot": 0, "j": 0, "size": 4096}, 0, b"x" * 4096,
                         timeout=2)
    finally:
        intruder.close()
    assert not list(target.shm.glob(f"ftd-*/parity/s{step + 1}-*")), "an unauthenticated write landed"
    assert "refused peer call" in target.daemon_log.read_text()
    assert target.status().protected_step >= step

    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ftd", "status", "--cluster", "--json"], env=target.env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    doc = json.loads(out)
    assert doc["ec"] == "3+1" and doc["group"] == [0, 1, 2, 3] and doc["node_index"] == 0
    assert sorted(p["node"] for p in doc["peers"]) == [1, 2, 3]
    assert all(p["up"] and p["protected_step"] >= step and p["ranks"] == [p["node"]] for p in doc["peers"])
    human = subprocess.run([sys.executable, "-m", "ftd", "status", "--cluster"], env=target.env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "EC 3+1: node 0 in group [0, 1, 2, 3]" in human and "(this node)" in human


@pytest.mark.parametrize("nodes4", [("2+2", "auto", "localhost")], indirect=True, ids=["2+2-by-dns-name"])
@pytest.mark.timeout(120 + 60 + 180 + 60)  # the budgets below
def test_losing_m_nodes_at_once_resumes_bit_exact(nodes4: list[Node], tmp_path: Path):
    """2+2 over 4 nodes named by DNS ("localhost:port", as a headless service's pods are): nodes 1 and 3
    lose everything at once; both replacements rebuild from the two survivors and every node's trainer
    finishes bit-exact against an uninterrupted run."""
    assert nodes4[0].env["FTD_PEERS"].startswith("localhost:")
    refs = _references(tmp_path, range(4))
    procs = [n.trainer(["--steps", str(STEPS), "--stop-at", "10"], RANK=str(n.index)) for n in nodes4]
    assert all(p.wait(120) == 0 for p in procs)
    step = wait_protected(nodes4, 10)
    originals = {i: _segment_bytes(nodes4[i], step) for i in (1, 3)}
    for i in (1, 3):
        nodes4[i].lose_everything()
    for i in (1, 3):
        nodes4[i].start_daemon()
    for i in (1, 3):
        client = DaemonClient(nodes4[i].env["FTD_SOCKET"], "ectest", i, timeout=60)
        try:
            assert client.list_steps() == [step]  # returns once the rebuild is done
        finally:
            client.close()
        assert f"rebuilt node {i} step {step} from peers" in nodes4[i].daemon_log.read_text()
        assert originals[i] == _segment_bytes(nodes4[i], step)
    procs = [n.trainer(["--steps", str(STEPS)], RANK=str(n.index)) for n in nodes4]
    assert all(p.wait(180) == 0 for p in procs)
    for n in nodes4:
        log = n.log.read_text()
        assert f"resumed at step {step}" in log, log[-2000:]
        ref_losses, ref_params = refs[n.index]
        assert read_losses(n.losses, n.index) == ref_losses
        got = torch.load(n.root / f"params-{n.index}.pt", weights_only=True)
        assert not differing(got, ref_params), differing(got, ref_params)
