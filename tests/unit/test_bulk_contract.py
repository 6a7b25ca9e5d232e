"""The bulk-plane contract (ftd.daemon.bulk), one test suite run against both transports:
ZeroMQ over real CurveZMQ sockets on 127.0.0.1, and the in-process fabric."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ftd.daemon.bulk import BulkClient, PeerRejected, PeerUnavailable, Reader, Writer
from ftd.daemon.inproc import Fabric
from ftd.daemon.transport import ZmqTransport, curve_keys
from tests.unit.bulkregions import Memory

pytestmark = pytest.mark.timeout(20)

MiB = 1 << 20
CHUNK = 1 * MiB
SIZE = 20 * MiB + 12345  # many pieces, and a short last one


@dataclass
class Plane:
    """One transport under test: serve node 0, make clients of it, and a client of a dead node."""

    serve: Callable[[Reader, Writer], None]
    client: Callable[[], BulkClient]
    dead_client: Callable[[], BulkClient]
    close: Callable[[], None]


def _zmq_plane() -> Plane:
    keys = curve_keys("contract-test-cluster-token-0123456789")
    server = ZmqTransport("tcp://127.0.0.1:0", lambda node: server.server.endpoint, keys, max_chunk=CHUNK)
    gone = ZmqTransport("tcp://127.0.0.1:0", lambda node: gone.server.endpoint, keys, max_chunk=CHUNK)
    gone.serve(lambda k, o, n: b"", lambda k, o, d: None)
    dead_endpoint = gone.server.endpoint
    gone.close()
    dead = ZmqTransport("tcp://127.0.0.1:0", lambda node: dead_endpoint, keys, max_chunk=CHUNK)
    return Plane(server.serve, lambda: server.connect(0), lambda: dead.connect(1), server.close)


def _inproc_plane() -> Plane:
    fabric = Fabric(max_chunk=CHUNK)
    node0, node1 = fabric.transport(0), fabric.transport(1)
    return Plane(node0.serve, lambda: node1.connect(0), lambda: node0.connect(7), node0.close)


@pytest.fixture(params=["zmq", "inproc"])
def plane(request) -> Iterator[Plane]:
    p = _zmq_plane() if request.param == "zmq" else _inproc_plane()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def memory() -> Memory:
    return Memory({"src": bytearray(os.urandom(SIZE)), "dst": bytearray(SIZE)})


@pytest.fixture
def client(plane: Plane, memory: Memory) -> Iterator[BulkClient]:
    plane.serve(memory.read, memory.write)
    c = plane.client()
    try:
        yield c
    finally:
        c.close()


def test_get_put_one_piece(client: BulkClient, memory: Memory) -> None:
    src = memory.regions["src"]
    assert bytes(client.get({"name": "src"}, 1000, 4096, timeout=2)) == bytes(src[1000:5096])
    payload = os.urandom(CHUNK)
    client.put({"name": "dst"}, 77, memoryview(payload), timeout=2)
    assert memory.regions["dst"][77:77 + CHUNK] == payload
    assert bytes(client.get({"name": "dst"}, 77, 10, timeout=2)) == payload[:10]
    assert bytes(client.get({"name": "src"}, 5, 0, timeout=2)) == b""


def test_ranges_move_in_pieces_of_max_chunk(client: BulkClient, memory: Memory) -> None:
    src = memory.regions["src"]
    into = bytearray(SIZE)
    client.get_range({"name": "src"}, 0, SIZE, memoryview(into), timeout=3)
    assert into == src
    pieces = -(-SIZE // CHUNK)
    assert memory.reads == pieces
    client.put_range({"name": "dst"}, 0, memoryview(src), timeout=3)
    assert memory.regions["dst"] == src and memory.writes == pieces
    part = bytearray(5 * MiB)  # an unaligned sub-range into a larger buffer
    client.get_range({"name": "src"}, 123, 3 * MiB + 7, part, timeout=3)
    assert part[:3 * MiB + 7] == src[123:123 + 3 * MiB + 7] and not any(part[3 * MiB + 7:])


def test_refusals_become_peer_rejected_and_the_server_keeps_serving(client: BulkClient, memory: Memory) -> None:
    with pytest.raises(PeerRejected, match="KeyError: 'nope'") as err:
        client.get({"name": "nope"}, 0, 16, timeout=2)
    assert err.value.peer_message.startswith("KeyError")
    with pytest.raises(PeerRejected, match="ValueError: range .* beyond"):
        client.get({"name": "src"}, SIZE - 8, 16, timeout=2)
    with pytest.raises(PeerRejected, match="NotFound: no snapshot missing"):
        client.put({"name": "missing"}, 0, b"abc", timeout=2)
    with pytest.raises(PeerRejected, match="exceeds this server's max_chunk"):
        client.get({"name": "src"}, 0, CHUNK + 1, timeout=2)
    with pytest.raises(PeerRejected, match="beyond"):  # a failure in the middle of a range
        client.get_range({"name": "src"}, SIZE - 5 * CHUNK, 6 * CHUNK, bytearray(6 * CHUNK), timeout=3)
    assert bytes(client.get({"name": "src"}, 0, 64, timeout=2)) == bytes(memory.regions["src"][:64])


@pytest.mark.parametrize("key, why", [
    ({f"k{i}": i for i in range(17)}, "at most 16"),
    ({"name": "x" * 300}, "longer than 256"),
    ({"n" * 65: 1}, "key names"),
    ({"step": 1.5}, "string or a 64-bit integer"),
    ({"a": {"b": 1}}, "string or a 64-bit integer"),
])
def test_bad_keys_never_reach_the_reader(client: BulkClient, memory: Memory, key: dict, why: str) -> None:
    with pytest.raises(PeerRejected, match=why):
        client.get(key, 0, 1, timeout=2)
    assert memory.reads == 0


def test_reader_returning_the_wrong_size_is_refused(plane: Plane) -> None:
    plane.serve(lambda k, o, n: b"short", lambda k, o, d: None)
    c = plane.client()
    with pytest.raises(PeerRejected, match="reader returned 5 bytes for a request of 16"):
        c.get({"a": 1}, 0, 16, timeout=2)
    with pytest.raises(PeerRejected, match="reader returned"):
        c.get_range({"a": 1}, 0, 16, bytearray(16), timeout=2)
    c.close()


def test_unexpected_exceptions_do_not_stop_the_server(plane: Plane) -> None:
    def broken(key: dict[str, Any], offset: int, length: int) -> bytes:
        raise RuntimeError("boom")

    plane.serve(broken, lambda k, o, d: None)
    c = plane.client()
    for _ in range(3):
        with pytest.raises(PeerRejected, match="RuntimeError: boom"):
            c.get({"a": 1}, 0, 1, timeout=2)
    c.put({"a": 1}, 0, b"ok", timeout=2)
    c.close()


def test_requests_are_served_one_at_a_time(plane: Plane, memory: Memory) -> None:
    plane.serve(memory.read, memory.write)
    clients = [plane.client() for _ in range(3)]
    into = [bytearray(SIZE) for _ in clients]
    threads = [threading.Thread(target=c.get_range, args=({"name": "src"}, 0, SIZE, memoryview(b), 5))
               for c, b in zip(clients, into)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(b == memory.regions["src"] for b in into)
    assert memory.most_inside == 1
    for c in clients:
        c.close()


def test_a_dead_peer_raises_peer_unavailable_within_the_timeout(plane: Plane) -> None:
    c = plane.dead_client()
    for call in (lambda: c.get({"a": 1}, 0, 0, timeout=0.4),
                 lambda: c.put({"a": 1}, 0, b"abc", timeout=0.4),
                 lambda: c.get_range({"a": 1}, 0, 4 * MiB, bytearray(4 * MiB), timeout=0.4),
                 lambda: c.put_range({"a": 1}, 0, bytes(4 * MiB), timeout=0.4)):
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            call()
        assert time.monotonic() - t0 < 1.5
    c.close()


def test_a_slow_peer_times_out_and_its_late_answer_is_not_taken_for_the_next(client: BulkClient) -> None:
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable):
        client.get({"name": "slow"}, 0, 8, timeout=0.2)
    assert time.monotonic() - t0 < 0.5
    got = bytes(client.get({"name": "src"}, 0, 8, timeout=3))  # after the late "S" answer
    assert got != b"S" * 8 and len(got) == 8


def test_a_closed_client_raises(client: BulkClient) -> None:
    client.close()
    with pytest.raises(PeerUnavailable, match="closed"):
        client.get({"a": 1}, 0, 1, timeout=1)
