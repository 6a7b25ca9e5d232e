"""A process without the cluster token answers on a down peer's address: a real daemon ignores it.

Node 0 is a real daemon (in this process, real gRPC on a unix socket and TCP, real zmq, real
shm files); node 1's address is served by a hostile gRPC server that answers every heartbeat
with a crafted inventory: phantom steps, `rebuilding`, huge blobs and parity. Nothing of it may
be believed: the Status RPC shows the peer down with no steps, List answers with what the node
holds, and no parity is allocated.
"""

from __future__ import annotations

import socket
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from ftd._proto import peer_pb2 as pb
from ftd.client.rpc import DaemonClient
from ftd.config import DaemonConfig
from ftd.daemon.peers import HEARTBEAT_METHOD, PeerServer, PeerServicer
from ftd.daemon.server import Daemon
from ftd.demo.procs import free_port_pair
from ftd.errors import ConfigError, FtdError

TOKEN = "hostile-peer-test-token-0123456789abcdef"
JOB = "hostile"
BUDGET = 64 << 20


def _phantom_inventory() -> pb.Inventory:
    return pb.Inventory(
        job=JOB, node=1, incarnation=7, rebuilding=True, protected_step=5000, encoding_step=-1, ranks=[0, 1],
        steps=[pb.StepData(step=s, blob_bytes=2 << 30) for s in range(5000, 5010)],
        parity=[pb.ParityHeld(step=5000, rotation=r, j=0, chunk_bytes=2 << 30) for r in range(2)])


class Hostile:
    """A real gRPC server, without the token, answering Heartbeat with `_phantom_inventory()`."""

    def __init__(self, address: str):
        self.calls = 0

        def heartbeat(raw: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            context.set_trailing_metadata((("x-ftd-auth-reply", "1:" + "0" * 64),))  # a forged signature
            return pb.HeartbeatReply(inventory=_phantom_inventory()).SerializeToString()

        handler = grpc.method_handlers_generic_handler("ftd.v1.Peer", {
            "Heartbeat": grpc.unary_unary_rpc_method_handler(heartbeat)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        assert self.server.add_insecure_port(address)
        self.server.start()

    def wait_called(self, n: int, timeout: float = 30) -> None:
        for _ in range(int(timeout * 10)):
            if self.calls >= n:
                return
            time.sleep(0.1)
        raise AssertionError(f"the hostile server got {self.calls} heartbeats, expected {n}")

    def stop(self) -> None:
        self.server.stop(0).wait(2)


def _config(tmp_path: Path, peers: list[str], **overrides) -> DaemonConfig:
    values = dict(job=JOB, node="0", socket=str(tmp_path / "d.sock"), shm_dir=str(tmp_path / "shm"),
                  memory_reserve="0", memory_budget=str(BUDGET), metrics_port=0, peers=",".join(peers), ec="1+1",
                  heartbeat_interval=0.1, peer_timeout=1.0, rebuild_wait=0.5)
    values.update(overrides)
    return DaemonConfig.load(environ={"FTD_CLUSTER_TOKEN": TOKEN}, **values)


def _parity_bytes(shm: Path) -> int:
    return sum(p.stat().st_size for p in shm.glob("ftd-*/parity/*") if p.is_file())


@pytest.fixture
def cluster(tmp_path: Path):
    ports = [free_port_pair(), free_port_pair()]
    peers = [f"127.0.0.1:{p}" for p in ports]
    hostile = Hostile(peers[1])
    daemon = Daemon(_config(tmp_path, peers)).start()
    try:
        yield daemon, hostile, tmp_path
    finally:
        daemon.stop(grace=0.5)
        hostile.stop()


def test_a_hostile_heartbeat_reply_is_ignored(cluster):
    daemon, hostile, tmp_path = cluster
    hostile.wait_called(11)  # beats are sequential: the 11th call means ten crafted answers were read
    client = DaemonClient(daemon.config.socket, JOB, 0, timeout=10)
    try:
        status = client.status()
        (peer,) = status.peers
        assert peer.node == 1 and not peer.up and not peer.rebuilding
        assert list(peer.steps) == [] and peer.parity_chunks == 0 and peer.protected_step <= 0
        assert client.list_steps(timeout=10) == []  # answered from what the node holds: no phantom steps
        assert status.held_bytes <= BUDGET
    finally:
        client.close()
    assert daemon.redundancy.table.inventories() == {}  # a rebuilding peer would hold List: none is believed
    assert daemon.metrics.peer_refused._value.get() >= 10  # each one refused (nothing else refuses here)
    assert _parity_bytes(tmp_path / "shm") == 0
    assert daemon.redundancy.protector.alive() and daemon.redundancy.heartbeat._thread.is_alive()


def test_parity_beyond_the_budget_or_the_groups_blobs_is_refused(cluster):
    """Even an authenticated peer cannot make this node allocate more parity than its blobs imply
    or than the memory budget allows."""
    daemon, _, tmp_path = cluster
    p = daemon.redundancy
    assert p.service.parity_limit(5000) == 0  # no authenticated inventory announces any blob: no parity at all
    with pytest.raises(ValueError):  # 1+1 has no pushed parity (j 0 stays on its coordinator)
        p.service.write({"kind": "parity", "step": 5000, "rot": 1, "j": 0, "size": 2 << 30, "from": 1}, 0,
                 memoryview(b"x" * 4096))
    with pytest.raises(FtdError, match="memory budget"):
        p.parity.create(5000, 1, 0, BUDGET + 4096)
    assert _parity_bytes(tmp_path / "shm") == 0


def test_protection_gives_up_on_a_dead_peer_within_the_peer_timeout(tmp_path: Path):
    """Node 1's bulk port accepts TCP connections and never answers: encoding a step that needs its
    data fails after the peer timeout, not the 30 s transfer timeout."""
    from ftd import knobs
    from ftd.daemon.bulk import PeerUnavailable

    ports = [free_port_pair(), free_port_pair()]
    peers = [f"127.0.0.1:{p}" for p in ports]
    silent = socket.socket()
    silent.bind(("127.0.0.1", ports[1] + 1))
    silent.listen(8)  # the kernel accepts; nobody ever reads or answers
    daemon = Daemon(_config(tmp_path, peers)).start()
    try:
        p = daemon.redundancy
        assert p.transfer_timeout() == daemon.config.peer_timeout
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            p.protector.encoder.encode(3, {0: 4096, 1: 4096})  # rotation 0 of node 0 reads node 1's data first
        assert time.monotonic() - t0 < knobs.get().transfer_timeout / 2
        assert p.protector.alive()
    finally:
        daemon.stop(grace=0.5)
        silent.close()


def test_a_peer_port_in_use_is_a_clear_error(tmp_path: Path):
    port = free_port_pair()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen(1)
    try:
        config = _config(tmp_path, [f"127.0.0.1:{port}", f"127.0.0.1:{free_port_pair()}"])
        from ftd.daemon.peers import Membership, PeerTable
        from ftd.metrics import DaemonMetrics

        membership = Membership.from_config(config)
        servicer = PeerServicer(membership, PeerTable(membership, DaemonMetrics(), 1.0), JOB, pb.Inventory)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*FTD_LISTEN"):
            PeerServer(f"127.0.0.1:{port}", servicer, TOKEN, JOB, DaemonMetrics())
    finally:
        taken.close()
    assert HEARTBEAT_METHOD == "/ftd.v1.Peer/Heartbeat"


def test_a_pushed_parity_chunk_larger_than_the_groups_blobs_is_refused(tmp_path: Path):
    """1+2: parity j 1 of every rotation is pushed to this node; its size must follow from the blob
    sizes the group announced (none here), whatever the key says."""
    peers = [f"127.0.0.1:{free_port_pair()}" for _ in range(3)]
    daemon = Daemon(_config(tmp_path, peers, ec="1+2")).start()
    try:
        for size in (2 << 30, 4096):
            with pytest.raises(ValueError, match="imply at most 0"):
                daemon.redundancy.service.write({"kind": "parity", "step": 8, "rot": 1, "j": 1, "size": size,
                                                 "from": 1}, 0, memoryview(b"x" * 4096))
    finally:
        daemon.stop(grace=0.5)
    assert _parity_bytes(tmp_path / "shm") == 0
