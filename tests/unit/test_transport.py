"""ftd.daemon.transport over real CurveZMQ sockets on 127.0.0.1: what is ZeroMQ's own (windows, malformed
frames, authentication, sockets); the contract both transports keep is tests/unit/test_bulk_contract.py."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from ftd.daemon.transport import (
    MAX_WINDOW,
    THREAD_NAME,
    BulkClient,
    BulkServer,
    CurveKeys,
    curve_keys,
)
from ftd.daemon.bulk import PeerUnavailable
from tests.unit.bulkregions import Memory
from ftd.errors import ConfigError

pytestmark = pytest.mark.timeout(10)

TOKEN = "unit-test-cluster-token-0123456789abcdef"
MiB = 1 << 20
CHUNK = 1 * MiB
SIZE = 20 * MiB + 12345  # many pieces, and a short last one


@pytest.fixture(scope="module")
def keys() -> CurveKeys:
    return curve_keys(TOKEN)


@pytest.fixture
def memory() -> Memory:
    return Memory({"src": bytearray(os.urandom(SIZE)), "dst": bytearray(SIZE)})


@pytest.fixture
def server(keys: CurveKeys, memory: Memory) -> Iterator[BulkServer]:
    with BulkServer("tcp://127.0.0.1:0", keys, memory.read, memory.write, max_chunk=CHUNK) as srv:
        yield srv


@pytest.fixture
def client(keys: CurveKeys, server: BulkServer) -> Iterator[BulkClient]:
    with BulkClient(f"tcp://127.0.0.1:{server.port}", keys, max_chunk=CHUNK) as c:
        yield c


def _raw_dealer(ctx: zmq.Context, port: int, keys: CurveKeys) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _header(key: Any = None, offset: Any = 0, length: Any = 16) -> bytes:
    return json.dumps({"key": {"name": "src"} if key is None else key, "offset": offset, "length": length}).encode()


# --- keys ---------------------------------------------------------------------------------------


def test_curve_keys_are_deterministic_and_token_bound() -> None:
    a, b, other = curve_keys(TOKEN), curve_keys(TOKEN), curve_keys(TOKEN + "x")
    assert a == b
    assert len({a.server_public, a.client_public, a.server_secret, a.client_secret}) == 4
    assert zmq.curve_public(a.server_secret) == a.server_public
    assert other.server_public != a.server_public and other.client_public != a.client_public
    assert a.server_secret.decode() not in repr(a) and a.client_secret.decode() not in repr(a)
    with pytest.raises(ConfigError):
        curve_keys("")


# --- round trips --------------------------------------------------------------------------------


def test_get_range_and_put_range_many_pieces(client: BulkClient, memory: Memory, server: BulkServer) -> None:
    src = memory.regions["src"]
    into = bytearray(SIZE)
    client.get_range({"name": "src"}, 0, SIZE, memoryview(into), timeout=3, window=4)
    assert into == src
    pieces = -(-SIZE // CHUNK)
    assert memory.reads == pieces

    client.put_range({"name": "dst"}, 0, memoryview(src), timeout=3, window=4)
    assert memory.regions["dst"] == src
    assert memory.writes == pieces

    # an unaligned sub-range, into a larger buffer, window 1 and the largest window
    part = bytearray(5 * MiB)
    client.get_range({"name": "src"}, 123, 3 * MiB + 7, part, timeout=3, window=1)
    assert part[:3 * MiB + 7] == src[123:123 + 3 * MiB + 7] and not any(part[3 * MiB + 7:])
    client.get_range({"name": "src"}, 0, SIZE, into, timeout=3, window=MAX_WINDOW)
    assert into == src
    assert server.refused == 0 and server.dropped == 0


def test_window_bounds_requests_in_flight(client: BulkClient, memory: Memory) -> None:
    in_flight, peaks = 0, []
    send, recv = client._send, client._recv

    def counting_send(*args: Any, **kwargs: Any) -> bytes:
        nonlocal in_flight
        in_flight += 1
        peaks.append(in_flight)
        return send(*args, **kwargs)

    def counting_recv(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight
        result = recv(*args, **kwargs)
        in_flight -= 1
        return result

    client._send, client._recv = counting_send, counting_recv  # type: ignore[method-assign]
    for window in (1, 3, MAX_WINDOW):
        peaks.clear()
        into = bytearray(SIZE)
        client.get_range({"name": "src"}, 0, SIZE, into, timeout=3, window=window)
        assert into == memory.regions["src"] and in_flight == 0
        assert max(peaks) == window and len(peaks) == -(-SIZE // CHUNK)
        peaks.clear()
        client.put_range({"name": "dst"}, 0, memory.regions["src"][:8 * MiB], timeout=3, window=window)
        assert max(peaks) == min(window, 8) and in_flight == 0
    for window in (0, MAX_WINDOW + 1):
        with pytest.raises(ValueError):
            client.get_range({"name": "src"}, 0, 1, bytearray(1), timeout=1, window=window)


# --- malformed requests from an authenticated raw socket ------------------------------------------

RID = b"\x00\x00\x00\x00\x00\x00\x00\x2a"
MALFORMED = [
    ("one frame", [RID], "got 1 frame(s)"),
    ("no header", [RID, b"GET"], "got 2 frame(s)"),
    ("short request-id", [b"1234", b"GET", _header()], "request-id must be 8 bytes"),
    ("unknown op", [RID, b"DELETE", _header()], "unknown op"),
    ("GET with a data frame", [RID, b"GET", _header(), b"x" * 16], "GET takes 3 frames, got 4"),
    ("PUT without data", [RID, b"PUT", _header()], "PUT takes 4 frames, got 3"),
    ("PUT with two data frames", [RID, b"PUT", _header(), b"a", b"b"], "PUT takes 4 frames, got 5"),
    ("bad JSON", [RID, b"GET", b"{not json"], "not valid JSON"),
    ("not UTF-8", [RID, b"GET", b"\xff\xfe{}"], "not valid JSON"),
    ("deep nesting", [RID, b"GET", b"[" * 2000 + b"]" * 2000], "not valid JSON"),
    ("oversize header", [RID, b"GET", b" " * 5000], "at most 4096"),
    ("NaN", [RID, b"GET", b'{"key": {}, "offset": NaN, "length": 1}'], "NaN"),
    ("duplicate member", [RID, b"GET", b'{"key": {}, "offset": 0, "offset": 1, "length": 1}'], "duplicate"),
    ("header is a list", [RID, b"GET", b"[1, 2, 3]"], "exactly"),
    ("extra member", [RID, b"GET", b'{"key": {}, "offset": 0, "length": 1, "x": 1}'], "exactly"),
    ("non-dict key", [RID, b"GET", _header(key=["src"])], "key must be a JSON object"),
    ("key with 17 items", [RID, b"GET", _header(key={f"k{i}": i for i in range(17)})], "at most 16"),
    ("long key string", [RID, b"GET", _header(key={"name": "x" * 300})], "longer than 256"),
    ("long key name", [RID, b"GET", _header(key={"n" * 65: 1})], "key names"),
    ("float key value", [RID, b"GET", _header(key={"step": 1.5})], "string or a 64-bit integer"),
    ("nested key value", [RID, b"GET", _header(key={"a": {"b": 1}})], "string or a 64-bit integer"),
    ("negative offset", [RID, b"GET", _header(offset=-1)], "offset must be"),
    ("float length", [RID, b"GET", _header(length=1.0)], "length must be"),
    ("bool offset", [RID, b"GET", _header(offset=True)], "offset must be"),
    ("huge offset", [RID, b"GET", _header(offset=1 << 70)], "offset must be"),
    ("oversize length", [RID, b"GET", _header(length=CHUNK + 1)], "exceeds this server's max_chunk"),
    ("PUT size mismatch", [RID, b"PUT", _header(key={"name": "dst"}, length=16), b"x" * 17], "header says 16"),
    ("PUT short data", [RID, b"PUT", _header(key={"name": "dst"}, length=16), b""], "header says 16"),
]


def test_malformed_requests_get_err_and_server_survives(keys: CurveKeys, server: BulkServer, memory: Memory) -> None:
    ctx = zmq.Context()
    try:
        sock = _raw_dealer(ctx, server.port, keys)
        for name, frames, expected in MALFORMED:
            sock.send_multipart(frames)
            assert sock.poll(2000), f"{name}: no reply"
            reply = sock.recv_multipart()
            assert len(reply) == 3, f"{name}: {reply}"
            rid, status, text = reply
            assert status == b"ERR", f"{name}: {reply}"
            assert expected in text.decode(), f"{name}: {text!r}"
            assert rid == (frames[0] if len(frames[0]) <= 64 else b""), name
        # a well-formed request on the same connection still works
        sock.send_multipart([RID, b"GET", _header(length=16)])
        assert sock.poll(2000)
        assert sock.recv_multipart() == [RID, b"OK", b'{"offset": 0, "length": 16}', bytes(memory.regions["src"][:16])]
        sock.close()
    finally:
        ctx.term()
    assert memory.reads == 1 and memory.writes == 0
    assert server.refused == len(MALFORMED) and server._thread.is_alive()


def test_oversize_frame_disconnects_only_that_peer(keys: CurveKeys, server: BulkServer, client: BulkClient,
                                                    memory: Memory) -> None:
    ctx = zmq.Context()
    try:
        sock = _raw_dealer(ctx, server.port, keys)
        sock.send_multipart([RID, b"PUT", _header(key={"name": "dst"}, length=16), b"x" * (2 * CHUNK)])
        assert not sock.poll(300)  # dropped by ZMQ_MAXMSGSIZE before it reaches the server thread
        sock.close()
    finally:
        ctx.term()
    assert bytes(client.get({"name": "src"}, 0, 1, timeout=2)) == bytes(memory.regions["src"][:1])
    assert server.refused == 0


# --- authentication ----------------------------------------------------------------------------


def test_wrong_token_cannot_get_anything(server: BulkServer, memory: Memory) -> None:
    wrong = curve_keys("some-other-cluster-token-fedcba9876543210")
    with BulkClient(f"tcp://127.0.0.1:{server.port}", wrong) as c:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="no reply"):
            c.get({"name": "src"}, 0, 16, timeout=0.5)
        assert time.monotonic() - t0 < 1.5
        with pytest.raises(PeerUnavailable):
            c.put({"name": "dst"}, 0, b"x" * 16, timeout=0.3)
    assert memory.reads == 0 and memory.writes == 0


def test_known_server_key_but_unknown_client_key_is_denied_by_zap(keys: CurveKeys, server: BulkServer,
                                                                   memory: Memory) -> None:
    stranger = curve_keys("a-stranger-who-learned-the-server-public-key")
    forged = CurveKeys(keys.server_public, b"", stranger.client_public, stranger.client_secret)
    with BulkClient(f"tcp://127.0.0.1:{server.port}", forged) as c:
        with pytest.raises(PeerUnavailable):
            c.get({"name": "src"}, 0, 16, timeout=0.5)
    assert server.denied >= 1
    assert memory.reads == 0


def test_client_without_curve_is_refused(keys: CurveKeys, server: BulkServer, memory: Memory) -> None:
    with BulkClient(f"tcp://127.0.0.1:{server.port}", keys, curve=False) as c:
        with pytest.raises(PeerUnavailable):
            c.get({"name": "src"}, 0, 16, timeout=0.5)
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(f"tcp://127.0.0.1:{server.port}")
        raw.send_multipart([RID, b"GET", _header()])
        assert not raw.poll(300)
        raw.close()
    finally:
        ctx.term()
    assert memory.reads == 0


def test_plaintext_mode_round_trip(keys: CurveKeys, memory: Memory) -> None:
    with BulkServer("tcp://127.0.0.1:0", keys, memory.read, memory.write, max_chunk=CHUNK, curve=False) as srv, \
            BulkClient(f"tcp://127.0.0.1:{srv.port}", keys, max_chunk=CHUNK, curve=False) as c:
        into = bytearray(3 * MiB)
        c.get_range({"name": "src"}, 1, len(into), into, timeout=2)
        assert into == memory.regions["src"][1:1 + len(into)]


def test_unencrypted_mode_authenticates_by_the_token_derived_password(keys: CurveKeys, memory: Memory) -> None:
    with BulkServer("tcp://127.0.0.1:0", keys, memory.read, memory.write, max_chunk=CHUNK, encrypt=False) as srv:
        endpoint = f"tcp://127.0.0.1:{srv.port}"
        with BulkClient(endpoint, keys, max_chunk=CHUNK, encrypt=False) as c:
            into = bytearray(3 * MiB)
            c.get_range({"name": "src"}, 1, len(into), into, timeout=2)
            assert memoryview(into) == memoryview(memory.regions["src"])[1:1 + len(into)]
        reads = memory.reads
        stranger = curve_keys("a-stranger-without-the-token")
        for other, encrypt in ((stranger, False), (keys, True)):  # wrong password; CURVE against a PLAIN server
            with BulkClient(endpoint, other, max_chunk=CHUNK, encrypt=encrypt) as c:
                with pytest.raises(PeerUnavailable):
                    c.get({"name": "src"}, 0, 16, timeout=0.5)
        assert srv.denied >= 1
        assert memory.reads == reads


def test_a_plain_client_is_refused_by_an_encrypting_server(keys: CurveKeys, server: BulkServer,
                                                           memory: Memory) -> None:
    with BulkClient(f"tcp://127.0.0.1:{server.port}", keys, encrypt=False) as c:
        with pytest.raises(PeerUnavailable):
            c.get({"name": "src"}, 0, 16, timeout=0.5)
    assert memory.reads == 0


# --- timeouts, stale replies, lifecycle ----------------------------------------------------------


def test_stale_reply_after_timeout_is_not_taken_for_a_new_one(keys: CurveKeys, memory: Memory) -> None:
    slow = threading.Event()

    def read(key: dict[str, Any], offset: int, length: int) -> bytes:
        if key["name"] == "slow":
            slow.wait(2)
            return b"S" * length
        return b"F" * length

    with BulkServer("tcp://127.0.0.1:0", keys, read, memory.write) as srv, \
            BulkClient(f"tcp://127.0.0.1:{srv.port}", keys) as c:
        with pytest.raises(PeerUnavailable):
            c.get({"name": "slow"}, 0, 8, timeout=0.3)
        slow.set()  # the late "S" reply now goes to the old (closed) socket
        assert bytes(c.get({"name": "fast"}, 0, 8, timeout=2)) == b"F" * 8
        # the same holds without recreating the socket: unknown request ids are dropped
        slow.clear()
        sock = c._sock
        c._reset = lambda: None  # type: ignore[method-assign]
        with pytest.raises(PeerUnavailable):
            c.get({"name": "slow"}, 0, 8, timeout=0.3)
        slow.set()
        assert c._sock is sock
        assert bytes(c.get({"name": "fast"}, 0, 8, timeout=2)) == b"F" * 8


def test_close_joins_the_thread(keys: CurveKeys, memory: Memory) -> None:
    srv = BulkServer("tcp://127.0.0.1:0", keys, memory.read, memory.write)
    thread = srv._thread
    assert thread.name == THREAD_NAME and thread.is_alive()
    assert any(t is thread for t in threading.enumerate())
    t0 = time.monotonic()
    srv.close()
    assert not thread.is_alive() and time.monotonic() - t0 < 1.0
    srv.close()  # idempotent
    # the port is free again
    with BulkServer(f"tcp://127.0.0.1:{srv.port}", keys, memory.read, memory.write) as again:
        assert again.port == srv.port


def test_bind_failure_is_a_config_error(keys: CurveKeys, server: BulkServer) -> None:
    with pytest.raises(ConfigError, match="cannot bind"):
        BulkServer(f"tcp://127.0.0.1:{server.port}", keys, lambda k, o, n: b"", lambda k, o, d: None)
    with pytest.raises(ConfigError, match="cannot connect"):
        BulkClient("nonsense://x", keys)
