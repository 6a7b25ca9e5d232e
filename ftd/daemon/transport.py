"""Bulk data plane between node daemons: chunked GET/PUT of byte ranges over CurveZMQ (docs/ARCHITECTURE.md §5.5, §8.4).

A `BulkServer` (ROUTER) serves byte ranges of the daemon's memory through two callbacks, a
`Reader` and a `Writer`; a `BulkClient` (DEALER, one per peer) pulls or pushes ranges in pieces
of at most `max_chunk` bytes with a bounded number of requests in flight. Metadata is JSON and
strictly validated; nothing is ever unpickled.

Wire format (ZeroMQ multipart messages; the ROUTER's routing-id frame is not shown):

    request   [request-id: 8 bytes][op: b"GET" | b"PUT"][header: JSON][data: PUT only]
    reply     [request-id: 8 bytes][status: b"OK" | b"ERR"][header JSON | error text][data: GET OK only]

* request-id: opaque 8 bytes chosen by the client (a big-endian counter), echoed in the reply.
  The client matches replies by id and drops any it is not waiting for (late replies to a request
  that already timed out).
* request header: a UTF-8 JSON object with exactly the members
  `{"key": {str: str | int}, "offset": int >= 0, "length": int >= 0}`; the key has at most 16
  items, names of at most 64 characters and string values of at most 256. `length` is at most the
  server's `max_chunk`; a PUT's data frame holds exactly `length` bytes.
* OK reply header: `{"offset": int, "length": int}` echoing the request; a GET's data frame holds
  exactly `length` bytes.
* ERR reply: UTF-8 text saying what was wrong (a malformed request, or the exception the
  reader/writer raised). The server keeps serving after any request, good or bad.

Security: both ends derive a CURVE server keypair and a client keypair from the cluster token
(`curve_keys`). The server only completes handshakes with clients that know the server public
key, and its ZAP handler only admits the client public key, so a peer without the token never
reaches the reader or writer. The token must be a high-entropy secret: the server public key is
visible to anyone who can connect, and a guessable token could be found from it offline.

Backpressure: a client keeps at most `window` (<= MAX_WINDOW) requests in flight (credit-based:
one new request per reply), and every socket has a high-water mark of `HWM` messages; a server
drops (and counts) a reply it cannot queue rather than block on a peer that does not read. Data frames are sent
without copying where pyzmq allows (`copy=False`), so a Reader may return a memoryview over
shared memory; that memory must stay valid and unchanged until the reply has left (sealed
snapshots are immutable, which is what the daemon serves).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils import z85

from ftd.daemon.bulk import (
    DEFAULT_MAX_CHUNK,
    MAX_INT,
    BadKey,
    PeerRejected,
    PeerUnavailable,
    Reader,
    Writer,
    byte_view,
    check_key,
    error_text,
)
from ftd.errors import ConfigError, FtdError

log = logging.getLogger(__name__)

HWM = 16
"""High-water mark (messages) of every bulk socket."""
MAX_WINDOW = HWM // 2
"""Largest client window. libzmq tells a pipe's writer about consumed messages only every HWM/2
reads, so a writer may see a pipe as full with up to HWM/2 - 1 messages already read; a window of
at most HWM/2 therefore never meets a full queue, on either side, from a well-behaved client."""
MAX_HEADER_BYTES = 4096
ZAP_DOMAIN = b"ftd-bulk"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
THREAD_NAME = "ftd-bulk-server"

GET, PUT = b"GET", b"PUT"
OK, ERR = b"OK", b"ERR"
_ID = struct.Struct(">Q")
_POLL_MS = 50
_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE keypairs of the bulk plane: one for every server, one for every client."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)
    plain_password: bytes = field(default=b"", repr=False)
    """The client's password of the unencrypted mode (ZMQ PLAIN), derived from the token too."""


def curve_keys(cluster_token: str) -> CurveKeys:
    """Derive the bulk plane's keypairs from the cluster token; every node derives the same ones."""
    if not cluster_token:
        raise ConfigError("the bulk data plane needs a non-empty cluster_token")

    def pair(label: bytes) -> tuple[bytes, bytes]:
        secret = z85.encode(hashlib.sha256(label + b"\0" + cluster_token.encode()).digest())
        return zmq.curve_public(secret), secret

    server_public, server_secret = pair(b"ftd-curve-server")
    client_public, client_secret = pair(b"ftd-curve-client")
    password = hashlib.sha256(b"ftd-plain-client\0" + cluster_token.encode()).hexdigest().encode()
    return CurveKeys(server_public, server_secret, client_public, client_secret, password)


# --- request validation (server side) -------------------------------------------------------------


class _BadRequest(Exception):
    """A request that does not follow the wire format; its text goes back in an ERR reply."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _BadRequest("header has duplicate JSON members")
    return obj


def _no_constants(name: str) -> Any:
    raise _BadRequest(f"header contains {name}, which is not JSON")


def _check_int(name: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:  # bool is an int subclass: excluded
        raise _BadRequest(f"{name} must be an integer in [0, 2**63), got {value!r:.40}")
    return value


def parse_header(raw: bytes | memoryview, max_chunk: int) -> tuple[dict[str, str | int], int, int]:
    """Validate a request header; return (key, offset, length) or raise _BadRequest."""
    if len(raw) > MAX_HEADER_BYTES:
        raise _BadRequest(f"header is {len(raw)} bytes, at most {MAX_HEADER_BYTES} allowed")
    try:
        obj = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _BadRequest(f"header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != {"key", "offset", "length"}:
        raise _BadRequest('header must be a JSON object with exactly "key", "offset" and "length"')
    try:
        key = check_key(obj["key"])
    except BadKey as exc:
        raise _BadRequest(str(exc)) from None
    offset = _check_int("offset", obj["offset"])
    length = _check_int("length", obj["length"])
    if length > max_chunk:
        raise _BadRequest(f"length {length} exceeds this server's max_chunk {max_chunk}")
    return key, offset, length


# --- server ---------------------------------------------------------------------------------------


class BulkServer:
    """Serves GET/PUT of byte ranges to authenticated peers from one thread (`ftd-bulk-server`).

    `bind` is a ZeroMQ endpoint such as "tcp://0.0.0.0:7001"; port 0 picks a free port (see
    `.port`). The reader and writer run on the server thread, one request at a time; whatever
    they raise goes back to the client as an ERR reply. `curve=False` turns encryption and
    authentication off and exists only for benchmarks. `encrypt=False` (with `curve`) keeps the
    authentication but not the encryption: ZMQ PLAIN with a password derived from the token, checked
    by the same ZAP handler (`bulk_encrypt` = false, for trusted fabrics: docs/ARCHITECTURE.md §8.4).
    """

    def __init__(self, bind: str, keys: CurveKeys, reader: Reader, writer: Writer,
                 max_chunk: int = DEFAULT_MAX_CHUNK, *, curve: bool = True, encrypt: bool = True,
                 on_error: Callable[[], None] | None = None):
        """`on_error` is called (on the server thread) for every unexpected exception the thread survives."""
        if max_chunk <= 0:
            raise ConfigError(f"max_chunk must be positive, got {max_chunk}")
        self.max_chunk = max_chunk
        self.errors = 0  # unexpected exceptions the server thread survived
        self._on_error = on_error
        self._reader, self._writer = reader, writer
        self._client_key = z85.decode(keys.client_public)
        self._password = keys.plain_password
        self._plain = curve and not encrypt
        if self._plain and not self._password:
            raise ConfigError("the unencrypted bulk mode needs keys with a plain_password (curve_keys)")
        self._stop = threading.Event()
        self.served = 0  # requests answered OK
        self.refused = 0  # requests answered ERR
        self.dropped = 0  # replies that could not be queued (peer gone or not reading)
        self.denied = 0  # handshakes refused by the ZAP handler
        self._denied_from: set[bytes] = set()
        self._ctx = zmq.Context()
        self._zap: zmq.Socket | None = None
        try:
            if curve:  # the ZAP handler must be bound before the first handshake
                self._zap = self._ctx.socket(zmq.REP)
                self._zap.linger = 0
                self._zap.bind(ZAP_ENDPOINT)
            sock = self._ctx.socket(zmq.ROUTER)
            self._sock = sock
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = HWM
            sock.router_mandatory = 1  # unroutable replies raise instead of vanishing silently
            sock.maxmsgsize = max_chunk + MAX_HEADER_BYTES  # a larger frame disconnects its sender
            if self._plain:
                sock.plain_server = True
                sock.zap_domain = ZAP_DOMAIN
            elif curve:
                sock.curve_server = True
                sock.curve_secretkey = keys.server_secret
                sock.curve_publickey = keys.server_public
                sock.zap_domain = ZAP_DOMAIN
            sock.bind(bind)
            self.endpoint = sock.last_endpoint.decode()
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise ConfigError(f"cannot bind the bulk server to {bind!r}: {exc}; bulk data uses the peer port + 1: "
                              f"set FTD_LISTEN (or this node's FTD_PEERS entry) to a port whose next port is free "
                              f"too") from exc
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self._thread = threading.Thread(target=self._serve, name=THREAD_NAME, daemon=True)
        self._thread.start()
        if self._plain:
            log.warning("bulk server on %s authenticated but NOT encrypted (bulk_encrypt=false: trusted fabrics "
                        "only; max_chunk %d)", self.endpoint, max_chunk)
        elif curve:
            log.info("bulk server on %s (CurveZMQ, max_chunk %d)", self.endpoint, max_chunk)
        else:
            log.warning("bulk server on %s WITHOUT encryption or authentication (benchmarks only)", self.endpoint)

    def __enter__(self) -> BulkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = _JOIN_TIMEOUT_S) -> None:
        """Stop the server thread and release the sockets; waits at most `timeout` seconds."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a callback: leave its sockets to it rather than hang
            log.warning("bulk server thread did not stop within %.1fs; leaking its sockets", timeout)
            return
        self._ctx.term()

    # The methods below run on the server thread only.

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap, zmq.POLLIN)
        last = ""
        try:
            while not self._stop.is_set():
                try:
                    self._serve_once(poller)
                    last = ""
                except zmq.ZMQError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the bulk server thread must outlive any request
                    self.errors += 1
                    if self._on_error is not None:
                        self._on_error()
                    message = f"{type(exc).__name__}: {exc}"
                    if message != last:
                        log.exception("bulk server: unexpected error (the thread goes on)")
                    last = message
        except zmq.ZMQError:
            log.exception("bulk server socket failed; the bulk plane is down")
            if self._on_error is not None:
                self._on_error()
        finally:
            self._sock.close(linger=0)
            if self._zap is not None:
                self._zap.close(linger=0)

    def _serve_once(self, poller: zmq.Poller) -> None:
        ready = dict(poller.poll(_POLL_MS))
        if self._zap is not None and self._zap in ready:
            self._authenticate(self._zap.recv_multipart())
        if self._sock in ready:
            for _ in range(HWM):  # a bounded batch, so handshakes and stop are not starved
                try:
                    frames = self._sock.recv_multipart(zmq.DONTWAIT, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)

    def _authenticate(self, msg: list[bytes]) -> None:
        """Answer one ZAP request (RFC 27): admit only the client key (CURVE) or password (PLAIN) derived
        from the token, and only the mechanism this server was made for."""
        if len(msg) < 6:
            log.warning("malformed ZAP request (%d frames)", len(msg))
            self._zap.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"", b"500", b"malformed", b"", b""])
            return
        version, request_id, _domain, address, _identity, mechanism = msg[:6]
        credentials = msg[6:]
        if self._plain:
            admitted = (version == b"1.0" and mechanism == b"PLAIN" and len(credentials) == 2
                        and hmac.compare_digest(credentials[1], self._password))
        else:
            admitted = (version == b"1.0" and mechanism == b"CURVE" and len(credentials) == 1
                        and hmac.compare_digest(credentials[0], self._client_key))
        if admitted:
            reply = [b"1.0", request_id, b"200", b"OK", b"ftd-peer", b""]
        else:
            self.denied += 1
            # a refused client keeps reconnecting: warn once per address, then only at debug level
            first = address not in self._denied_from and len(self._denied_from) < 1024
            self._denied_from.add(address)
            log.log(logging.WARNING if first else logging.DEBUG,
                    "refused a bulk connection from %s (%s): unknown client credentials",
                    address.decode(errors="replace"), mechanism.decode(errors="replace"))
            reply = [b"1.0", request_id, b"400", b"unknown client credentials", b"", b""]
        self._zap.send_multipart(reply)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0]
        rid = frames[1].bytes if len(frames) > 1 and len(frames[1]) <= 64 else b""
        try:
            if len(frames) < 4:
                raise _BadRequest(f"expected frames [request-id, op, header(, data)], got {len(frames) - 1} frame(s)")
            if len(frames[1]) != 8:
                raise _BadRequest(f"request-id must be 8 bytes, got {len(frames[1])}")
            op = frames[2].bytes
            if op not in (GET, PUT):
                raise _BadRequest(f"unknown op {op[:16]!r}, expected GET or PUT")
            want = 4 if op == GET else 5
            if len(frames) != want:
                raise _BadRequest(f"{op.decode()} takes {want - 1} frames, got {len(frames) - 1} frame(s)")
            key, offset, length = parse_header(frames[3].buffer, self.max_chunk)
            if op == PUT and len(frames[4]) != length:
                raise _BadRequest(f"PUT data frame is {len(frames[4])} bytes, header says {length}")
        except _BadRequest as exc:
            return self._reply_error(ident, rid, f"bad request: {exc}")
        header = json.dumps({"offset": offset, "length": length}).encode()
        # The one broad catch of the bulk plane, on purpose: a failing reader/writer (unknown key,
        # out of range, a bug) must become an ERR reply, never the death of the server thread.
        try:
            if op == GET:
                data = self._get(key, offset, length)
            else:
                self._writer(key, offset, frames[4].buffer)
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, (KeyError, ValueError, IndexError, FtdError)):
                log.exception("bulk %s %s @%d+%d failed", op.decode(), key, offset, length)
            return self._reply_error(ident, rid, error_text(exc))
        self.served += 1
        self._send([ident, rid, OK, header] + ([data] if op == GET else []))

    def _get(self, key: dict[str, Any], offset: int, length: int) -> memoryview:
        view = memoryview(self._reader(key, offset, length))
        if not view.c_contiguous:
            raise ValueError("reader returned a non-contiguous buffer")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes != length:
            raise ValueError(f"reader returned {view.nbytes} bytes for a request of {length}")
        return view

    def _reply_error(self, ident: zmq.Frame, rid: bytes, text: str) -> None:
        self.refused += 1
        log.debug("bulk request refused: %s", text)
        self._send([ident, rid, ERR, text.encode(errors="replace")])

    def _send(self, parts: list[Any]) -> None:
        try:
            self._sock.send_multipart(parts, zmq.DONTWAIT, copy=False)
        except zmq.Again:  # the peer has HWM replies queued: it is not reading, or ignores its window
            self.dropped += 1
            log.warning("dropped a bulk reply: the peer's queue is full")
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.dropped += 1  # the peer disconnected (e.g. gave up after a timeout)
            log.debug("dropped a bulk reply: the peer is gone")


# --- client ---------------------------------------------------------------------------------------


class BulkClient:
    """Pulls and pushes byte ranges from one peer's BulkServer.

    Calls are serialized (one lock). `timeout` is the longest wait for any one reply: a transfer
    that keeps making progress is never cut off, one that stalls for `timeout` seconds raises
    PeerUnavailable, and the socket is then recreated so late replies cannot be confused with
    new ones. `max_chunk` is the piece size of ranged calls and must not exceed the server's.
    """

    def __init__(self, endpoint: str, keys: CurveKeys, *, max_chunk: int = DEFAULT_MAX_CHUNK,
                 curve: bool = True, encrypt: bool = True, context: zmq.Context | None = None):
        if max_chunk <= 0:
            raise ConfigError(f"max_chunk must be positive, got {max_chunk}")
        self.endpoint, self.max_chunk = endpoint, max_chunk
        self._keys, self._curve, self._plain = keys, curve, curve and not encrypt
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None
        try:
            self._sock = self._connect()
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"cannot connect a bulk client to {endpoint!r}: {exc}") from exc

    def __enter__(self) -> BulkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            if self._own_ctx and not self._ctx.closed:
                self._ctx.term()

    def get(self, key: dict[str, Any], offset: int, length: int, timeout: float) -> bytes | memoryview:
        """Read one piece (`length` <= the server's max_chunk); returns a view of the received frame."""
        with self._lock:
            sock = self._socket()
            rid = self._send(sock, GET, key, offset, length)
            try:
                _, frames = self._recv(sock, {rid: 0}, timeout, GET, key)
            except PeerUnavailable:
                self._reset()
                raise
            if len(frames) != 1 or len(frames[0]) != length:
                raise PeerRejected(f"peer {self.endpoint}: malformed GET reply")
            return frames[0].buffer

    def put(self, key: dict[str, Any], offset: int, data: memoryview | bytes, timeout: float) -> None:
        """Write one piece (`len(data)` <= max_chunk) at `offset`."""
        view = byte_view(data)
        if view.nbytes > self.max_chunk:
            raise ValueError(f"put of {view.nbytes} bytes exceeds max_chunk {self.max_chunk}; use put_range")
        self._range(PUT, key, offset, view.nbytes, view, timeout, 1, self.max_chunk)

    def get_range(self, key: dict[str, Any], offset: int, length: int, into: memoryview | bytearray,
                  timeout: float, window: int = 4) -> None:
        """Read `length` bytes at `offset` into `into[:length]`, `window` pieces of max_chunk in flight."""
        view = byte_view(into)
        if view.readonly or view.nbytes < length:
            raise ValueError(f"`into` must be a writable buffer of at least {length} bytes")
        self._range(GET, key, offset, length, view, timeout, window, self.max_chunk)

    def put_range(self, key: dict[str, Any], offset: int, data: memoryview | bytes, timeout: float,
                  window: int = 4) -> None:
        """Write `data` at `offset` in pieces of max_chunk, at most `window` in flight."""
        view = byte_view(data)
        self._range(PUT, key, offset, view.nbytes, view, timeout, window, self.max_chunk)

    # --- internals (called with the lock held) ---

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = HWM
            if self._plain:
                sock.plain_username = b"ftd-peer"
                sock.plain_password = self._keys.plain_password
            elif self._curve:
                sock.curve_serverkey = self._keys.server_public
                sock.curve_publickey = self._keys.client_public
                sock.curve_secretkey = self._keys.client_secret
            sock.connect(self.endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            raise PeerUnavailable(f"bulk client for {self.endpoint} is closed")
        return self._sock

    def _reset(self) -> None:
        """Drop the socket with whatever it has queued and connect afresh (new identity, no stale replies)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._sock = self._connect()

    def _send(self, sock: zmq.Socket, op: bytes, key: dict[str, Any], offset: int, length: int,
              data: memoryview | None = None) -> bytes:
        rid = _ID.pack(next(self._ids) & MAX_INT)
        header = json.dumps({"key": key, "offset": offset, "length": length}).encode()
        parts: list[Any] = [rid, op, header] if data is None else [rid, op, header, data]
        try:
            sock.send_multipart(parts, zmq.DONTWAIT, copy=False)
        except zmq.Again:
            self._reset()
            raise PeerUnavailable(f"peer {self.endpoint}: send queue full (peer not reading)") from None
        return rid

    def _recv(self, sock: zmq.Socket, pending: dict[bytes, int], timeout: float, op: bytes,
              key: dict[str, Any], into: memoryview | None = None, piece: int = 0) -> tuple[bytes, list[zmq.Frame]]:
        """Wait for the reply to one of `pending` and return (request-id, frames after the header).

        With `into`, a GET's data frame is received straight into `into[pending[rid]:...]`
        (`piece` bytes at most) and no data frame is returned. Unknown ids are dropped.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(math.ceil(remaining * 1000), zmq.POLLIN):
                raise PeerUnavailable(f"peer {self.endpoint}: no reply to {op.decode()} {key} within {timeout:g}s")
            rid = sock.recv(zmq.DONTWAIT)
            if rid not in pending or not sock.rcvmore:
                log.debug("dropping a stale or malformed bulk reply from %s", self.endpoint)
                _drain(sock)
                continue
            status = sock.recv(zmq.DONTWAIT)
            text = sock.recv(zmq.DONTWAIT) if sock.rcvmore else b""
            if status != OK:
                _drain(sock)
                message = text.decode(errors="replace")
                raise PeerRejected(f"peer {self.endpoint}: {message}", message)
            if into is not None:
                start = pending[rid]
                size = sock.recv_into(into[start:start + piece], flags=zmq.DONTWAIT) if sock.rcvmore else -1
                if size != min(piece, into.nbytes - start) or sock.rcvmore:
                    _drain(sock)
                    raise PeerRejected(f"peer {self.endpoint}: GET reply of {size} bytes, expected {piece}")
                return rid, []
            frames = []
            while sock.rcvmore:
                frames.append(sock.recv(zmq.DONTWAIT, copy=False))
            return rid, frames

    def _range(self, op: bytes, key: dict[str, Any], offset: int, length: int, view: memoryview,
               timeout: float, window: int, chunk: int) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 1..{MAX_WINDOW}, got {window}")
        with self._lock:
            sock = self._socket()
            pending: dict[bytes, int] = {}  # request-id -> position in `view`
            target = view[:length] if op == GET else None  # replies are received straight into place
            pos = 0
            try:
                while pos < length or pending:
                    while pos < length and len(pending) < window:  # spend credit: one request per free slot
                        n = min(chunk, length - pos)
                        rid = self._send(sock, op, key, offset + pos, n, view[pos:pos + n] if op == PUT else None)
                        pending[rid] = pos
                        pos += n
                    rid, _ = self._recv(sock, pending, timeout, op, key, target, chunk)
                    del pending[rid]  # one reply back: one credit back
            except BaseException:
                if pending:
                    self._reset()  # late replies and queued requests go with the old socket
                raise


def _drain(sock: zmq.Socket) -> None:
    while sock.rcvmore:
        sock.recv(zmq.DONTWAIT, copy=False)


class ZmqTransport:
    """The production `BulkTransport` (ftd.daemon.bulk): a CurveZMQ server on this node's data
    endpoint and a DEALER client per peer. `endpoints` maps node -> ZeroMQ endpoint. `encrypt=False`:
    authenticated (ZMQ PLAIN) but not encrypted, for trusted fabrics; every node must agree."""

    def __init__(self, bind: str, endpoints: Callable[[int], str], keys: CurveKeys, *,
                 max_chunk: int = DEFAULT_MAX_CHUNK, on_error: Callable[[], None] | None = None,
                 encrypt: bool = True):
        self.bind, self.endpoints, self.keys, self.max_chunk = bind, endpoints, keys, max_chunk
        self.encrypt = encrypt
        self._on_error = on_error
        self.server: BulkServer | None = None

    def serve(self, reader: Reader, writer: Writer) -> None:
        self.server = BulkServer(self.bind, self.keys, reader, writer, self.max_chunk, encrypt=self.encrypt,
                                 on_error=self._on_error)

    def connect(self, node: int) -> BulkClient:
        return BulkClient(self.endpoints(node), self.keys, max_chunk=self.max_chunk, encrypt=self.encrypt)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
