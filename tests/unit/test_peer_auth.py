"""Peer-plane authentication: body- and nonce-bound request signatures, signed replies, validated
inventories, and a heartbeat thread that outlives any failure. Real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import grpc
import pytest

from ftd._proto import peer_pb2 as pb
from ftd.config import DaemonConfig
from ftd.daemon import auth
from ftd.daemon.groups import ECShape, plan_groups
from ftd.daemon.peers import (HEARTBEAT_METHOD, MAX_INVENTORY_STEPS, BadInventory, HeartbeatLoop, Membership,
                              PeerServer, PeerServicer, PeerTable, check_inventory)
from ftd.demo.procs import free_port_pair
from ftd.metrics import DaemonMetrics

TOKEN = "peer-auth-test-token-0123456789abcdef"
JOB = "j"


def _membership(peers: tuple[str, ...], me: int, ec: str = "1+1") -> Membership:
    shape = ECShape.parse(ec)
    return Membership(peers, me, shape, tuple(plan_groups(len(peers), shape)))


def _inventory(node: int, *steps: int) -> pb.Inventory:
    return pb.Inventory(job=JOB, node=node, incarnation=node + 1, protected_step=-1, encoding_step=-1,
                        steps=[pb.StepData(step=s, blob_bytes=4096) for s in steps], ranks=[node])


# ---- signatures ------------------------------------------------------------------------------


def test_a_signature_covers_the_body_and_is_good_once():
    body = _inventory(0, 3).SerializeToString(deterministic=True)
    value = auth.sign(TOKEN, JOB, 0, HEARTBEAT_METHOD, body, now=1000)
    nonces = auth.NonceCache()
    assert auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, value, body, nonces, now=1001) == 0
    with pytest.raises(PermissionError, match="replayed"):
        auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, value, body, nonces, now=1002)
    other = _inventory(0, 3, 4).SerializeToString(deterministic=True)
    with pytest.raises(PermissionError, match="bad signature"):
        auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, value, other, auth.NonceCache(), now=1001)
    with pytest.raises(PermissionError, match="s off"):
        auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, value, body, auth.NonceCache(), now=1000 + auth.MAX_SKEW_S + 1)


def test_a_full_nonce_cache_refuses_what_it_forgot():
    cache = auth.NonceCache(per_sender=4)
    values = [auth.sign(TOKEN, JOB, 2, HEARTBEAT_METHOD, b"", now=1000 + i) for i in range(6)]
    for v in values:
        auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, v, b"", cache, now=1010)
    for v in values:  # the two dropped ones are below the floor, the others are remembered
        with pytest.raises(PermissionError):
            auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, v, b"", cache, now=1010)
    fresh = auth.sign(TOKEN, JOB, 2, HEARTBEAT_METHOD, b"", now=1010)
    assert auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, fresh, b"", cache, now=1010) == 2
    bounded = auth.NonceCache(senders=1)
    auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, auth.sign(TOKEN, JOB, 0, HEARTBEAT_METHOD, b""), b"", bounded)
    with pytest.raises(PermissionError, match="senders"):
        auth.verify(TOKEN, JOB, HEARTBEAT_METHOD, auth.sign(TOKEN, JOB, 1, HEARTBEAT_METHOD, b""), b"", bounded)


def test_a_reply_signature_binds_node_request_and_body():
    body = pb.HeartbeatReply(inventory=_inventory(1, 5)).SerializeToString()
    value = auth.sign_reply(TOKEN, JOB, 1, HEARTBEAT_METHOD, "n" * 32, body)
    auth.verify_reply(TOKEN, JOB, 1, HEARTBEAT_METHOD, "n" * 32, body, value)
    for token, node, nonce, raw, v in [("other-token", 1, "n" * 32, body, value),
                                       (TOKEN, 2, "n" * 32, body, value),  # another node's name
                                       (TOKEN, 1, "m" * 32, body, value),  # an old reply to another call
                                       (TOKEN, 1, "n" * 32, body + b"\x20\x01", value),
                                       (TOKEN, 1, "n" * 32, body, None), (TOKEN, 1, "n" * 32, body, "1:00")]:
        with pytest.raises(PermissionError):
            auth.verify_reply(token, JOB, node, HEARTBEAT_METHOD, nonce, raw, v)


# ---- a real server -----------------------------------------------------------------------------


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps (metadata, request bytes) of every call that goes through the channel."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, bytes]] = []

    def intercept_unary_unary(self, continuation, details, request):
        self.calls.append((tuple(details.metadata or ()), request))
        return continuation(details, request)


@pytest.fixture
def pair():
    peers = tuple(f"127.0.0.1:{free_port_pair()}" for _ in range(2))
    m0, m1 = _membership(peers, 0), _membership(peers, 1)
    table1, metrics1 = PeerTable(m1, DaemonMetrics(), 5.0), DaemonMetrics()
    server = PeerServer(peers[1], PeerServicer(m1, table1, JOB, lambda: _inventory(1, 7)), TOKEN, JOB, metrics1)
    try:
        yield m0, table1, metrics1, server
    finally:
        server.stop()


def test_a_captured_heartbeat_cannot_be_replayed(pair):
    m0, table1, metrics1, _ = pair
    table0 = PeerTable(m0, DaemonMetrics(), 5.0)
    loop = HeartbeatLoop(m0, table0, TOKEN, JOB, 0.2, lambda: _inventory(0, 7))
    recorder = Recorder()
    channel = grpc.intercept_channel(loop._channels[1], recorder)
    loop._calls[1] = auth.SignedCaller(channel, HEARTBEAT_METHOD, TOKEN, JOB, 0)
    try:
        loop.beat_once()
    finally:
        loop.stop()
    assert set(table0.inventories()) == {1} and [s.step for s in table0.inventories()[1].steps] == [7]
    assert set(table1.inventories()) == {0}
    (metadata, body), = recorder.calls
    raw = grpc.insecure_channel(m0.peers[1])
    try:
        call = raw.unary_unary(HEARTBEAT_METHOD, request_serializer=None, response_deserializer=None)
        forged = pb.HeartbeatRequest(inventory=_inventory(0, 7, 999)).SerializeToString()
        for replay in (body, forged):  # the same call again; its signature on another body
            with pytest.raises(grpc.RpcError) as err:
                call(replay, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    finally:
        raw.close()
    assert metrics1.peer_refused._value.get() == 2
    assert [s.step for s in table1.inventories()[0].steps] == [7]  # nothing of the forged body was believed


def test_a_signed_inventory_for_another_node_is_refused(pair):
    m0, table1, _, _ = pair
    channel = grpc.insecure_channel(m0.peers[1])
    try:
        call = auth.SignedCaller(channel, HEARTBEAT_METHOD, TOKEN, JOB, 0)
        bad = pb.HeartbeatRequest(inventory=_inventory(0, *range(MAX_INVENTORY_STEPS + 1)))
        with pytest.raises(grpc.RpcError) as err:
            call(bad, pb.HeartbeatReply, 1, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    assert table1.inventories() == {}


def test_inventory_bounds():
    peers = tuple(f"h{i}:1" for i in range(4))
    m = _membership(peers, 0, "1+1")  # groups {0, 1} and {2, 3}
    good = _inventory(1, 3, 4)
    assert check_inventory(good, m, JOB, 1) is good
    too_big = _inventory(1, 3)
    too_big.steps[0].blob_bytes = 1 << 50
    rebuilding_outsider = pb.Inventory(job=JOB, node=2, rebuilding=True)
    stranger = _inventory(1, 3)
    stranger.job = "other"
    parity = _inventory(1, 3)
    parity.parity.append(pb.ParityHeld(step=3, rotation=5, j=0, chunk_bytes=4096))
    repeated = _inventory(1, 3, 3)
    for inv, node in [(good, 2), (too_big, 1), (rebuilding_outsider, 2), (stranger, 1), (parity, 1), (repeated, 1),
                      (_inventory(2, 3), 2)]:
        with pytest.raises(BadInventory):
            check_inventory(inv, m, JOB, node)


# ---- threads survive ---------------------------------------------------------------------------


def test_the_heartbeat_thread_survives_failing_beats(pair):
    m0, table1, _, _ = pair
    failures = {"left": 3}

    def inventory() -> pb.Inventory:
        if failures["left"]:
            failures["left"] -= 1
            raise KeyError("node 0 holds no data of step 9")
        return _inventory(0, 9)

    metrics0 = DaemonMetrics()
    table0 = PeerTable(m0, metrics0, 5.0)
    loop = HeartbeatLoop(m0, table0, TOKEN, JOB, 0.05, inventory).start()
    try:
        for _ in range(200):
            if table0.inventories():
                break
            time.sleep(0.05)
        assert loop._thread in threading.enumerate() and loop._thread.is_alive()
        assert loop.errors == 3
        assert metrics0.thread_errors.labels("ftd-heartbeat")._value.get() == 3
        assert set(table0.inventories()) == {1} and set(table1.inventories()) == {0}  # it went on beating
    finally:
        loop.stop()


def test_a_step_held_only_for_a_moved_rank_does_not_break_the_inventory(tmp_path: Path):
    """The real `KeyError: node N holds no data of step S`: a replacement daemon holds a step only as
    a segment fetched for a rank that moved here (not its own data). Its inventory must not raise."""
    from ftd.codec import make_codec
    from ftd.daemon.erasure import ErasureCoding
    from ftd.daemon.slots import Source
    from ftd.daemon.store import SegmentStore
    from ftd.manifest import EntrySpec, Manifest, chunk_checksums, layout

    peers = [f"127.0.0.1:{free_port_pair()}" for _ in range(2)]
    config = DaemonConfig.load(environ={"FTD_CLUSTER_TOKEN": TOKEN}, job=JOB, node="0", shm_dir=str(tmp_path / "shm"),
                               socket=str(tmp_path / "s.sock"), memory_reserve="0", peers=",".join(peers), ec="1+1")
    metrics = DaemonMetrics()
    store = SegmentStore(config, metrics)
    store.adopt()
    entries, total = layout([EntrySpec("model/w", "param", "float32", (16, 16))])
    data = bytes(i % 251 for i in range(total))
    entries = [dataclasses.replace(e, checksums=chunk_checksums(memoryview(data)[e.offset:e.offset + e.nbytes], 4096))
               for e in entries]
    manifest = Manifest(job=JOB, rank=1, world_size=2, step=9, chunk_bytes=4096, data_bytes=total,
                        entries=tuple(entries), meta={})
    store.install_sealed(1, 9, manifest.to_json(), memoryview(data), source=Source.FETCHED)
    assert 9 in store.complete_steps() and not store.blob_parts(9)
    membership = Membership.from_config(config)
    ec = ErasureCoding(config, membership, store, make_codec("auto", 1, 1), metrics)
    try:
        ec.protector.ready.set()
        inv = ec.protector.inventory()
        assert [s.step for s in inv.steps] == []  # not its own data: not announced, and no exception
    finally:
        ec.stop()
