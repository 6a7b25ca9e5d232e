"""Erasure coding across daemons on loopback: a node that loses its memory is rebuilt from its peers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftd.client.rpc import DaemonClient
from ftd.demo import results
from ftd.demo.cluster import Reference
from ftd.demo.procs import read_losses, wait_for_step
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


def _launch(node: Node, master: int, *extra: str):
    """Rank `node.index` of a 4-rank DDP job on gloo, started on `node`."""
    return node.trainer(["--steps", str(STEPS), *extra], RANK=str(node.index), WORLD_SIZE="4", LOCAL_RANK="0",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))


def _segment_bytes(node: Node, step: int) -> bytes:
    manifest = node.sealed_manifests(node.index).get(step)
    assert manifest is not None, f"node {node.index} holds no sealed step {step}"
    return Path(str(manifest).removesuffix(".manifest.json") + ".seg").read_bytes()


def _assert_resumed_bit_exact(nodes: list[Node], step: int, reference: Reference) -> None:
    """Every rank's last restore came back at `step`; its losses and final parameters equal the reference's."""
    for n in nodes:
        restored = [r for r in results.restores(n.results()) if r["rank"] == n.index]
        assert restored and restored[-1]["restored_step"] == step, (n.index, restored[-1:])
        assert read_losses(n.losses, n.index) == reference.rank_losses(n.index), f"rank {n.index} losses differ"
        got, want = n.params(n.index), reference.params(n.index)
        assert not differing(got, want), f"rank {n.index}: {differing(got, want)}"


@pytest.mark.timeout(180 + 120 + 30 + 200 + 180)  # the budgets below
def test_ddp_node_loss_resumes_bit_exact(nodes4: list[Node], tmp_path: Path):
    """3+1 over 4 nodes, a DDP rank per node: node 2 loses daemon, rank and memory; a replacement
    with the same identity rebuilds from peers; all ranks restart and end bit-exact."""
    reference = Reference(tmp_path / "reference", 4, ["--steps", str(STEPS)]).start()
    port = free_port()
    procs = [_launch(n, port, "--step-sleep", "0.2") for n in nodes4]
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
    procs = [_launch(n, port) for n in nodes4]
    assert all(p.wait(200) == 0 for p in procs), nodes4[2].log.read_text()[-3000:]
    reference.wait(180)

    metrics = nodes4[2].metrics()
    assert metrics.value("ftd_rebuilds_total", outcome="rebuilt") == 1
    rebuilt = int(metrics.value("ftd_rebuilt_step"))
    assert rebuilt >= protected
    _assert_resumed_bit_exact(nodes4, rebuilt, reference)


def test_unauthenticated_peer_cannot_read_or_write(nodes4: list[Node]):
    import grpc

    from ftd._proto import peer_pb2 as pb
    from ftd._proto import peer_pb2_grpc as pb_grpc
    from ftd.daemon import auth
    from ftd.daemon.bulk import PeerUnavailable
    from ftd.daemon.transport import BulkClient, curve_keys
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
    assert target.metrics().value("ftd_peer_refused_total") >= 4  # the four forged heartbeats
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


@pytest.mark.long  # the suite's time budget; losing m nodes at once is also covered by tests/unit/test_ec_inproc.py
@pytest.mark.parametrize("nodes4", [("2+2", "auto", "localhost")], indirect=True, ids=["2+2-by-dns-name"])
@pytest.mark.timeout(120 + 120 + 60 + 180 + 180)  # the budgets below
def test_losing_m_nodes_at_once_resumes_bit_exact(nodes4: list[Node], tmp_path: Path):
    """2+2 over 4 nodes named by DNS ("localhost:port", as a headless service's pods are): nodes 1 and 3
    lose everything at once; both replacements rebuild from the two survivors and every node's trainer
    finishes bit-exact against an uninterrupted run."""
    assert nodes4[0].env["FTD_PEERS"].startswith("localhost:")
    reference = Reference(tmp_path / "reference", 4, ["--steps", str(STEPS)]).start()
    port = free_port()
    procs = [_launch(n, port, "--stop-at", "10") for n in nodes4]
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
        assert nodes4[i].metrics().value("ftd_rebuilt_step") == step
        assert originals[i] == _segment_bytes(nodes4[i], step)
    port = free_port()
    procs = [_launch(n, port) for n in nodes4]
    assert all(p.wait(180) == 0 for p in procs)
    reference.wait(180)
    _assert_resumed_bit_exact(nodes4, step, reference)
