"""The in-process bulk transport: nodes of one process joined by a `Fabric`.

A second implementation of `ftd.daemon.bulk.BulkTransport`, held to the same contract test as
the ZeroMQ one (tests/unit/test_bulk_contract.py). It lets protection, rebuild and remote fetch
run several nodes in one process, and it can make a peer slow or unreachable on demand:
`Fabric.delay(node, seconds)` holds every request of that node, `Fabric.cut(node)` makes it
answer nothing (callers wait their timeout, as they would for a dead host).

Like the ZeroMQ server, every node serves from one thread of its own (`ftd-inproc-bulk`), one
request at a time; a caller waits at most its timeout for the answer, and an answer that comes
later is dropped.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

from ftd.daemon import bulk
from ftd.daemon.bulk import DEFAULT_MAX_CHUNK, BadKey, BulkClient, Key, PeerRejected, PeerUnavailable, Reader, Writer


class _Endpoint:
    """One node's server: its callbacks, called one request at a time."""

    def __init__(self, node: int, reader: Reader, writer: Writer):
        self.reader, self.writer = reader, writer
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ftd-inproc-bulk-{node}")
        self.served = 0
        self.refused = 0

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)


class Fabric:
    """The nodes of one process and the faults between them."""

    def __init__(self, max_chunk: int = DEFAULT_MAX_CHUNK):
        self.max_chunk = max_chunk
        self._lock = threading.Lock()
        self._nodes: dict[int, _Endpoint] = {}
        self._delay: dict[int, float] = {}
        self._cut: set[int] = set()

    def transport(self, node: int) -> InProcessTransport:
        """The BulkTransport of node `node`."""
        return InProcessTransport(self, node)

    def delay(self, node: int, seconds: float) -> None:
        """Hold every reply of `node` for `seconds` (0: none)."""
        with self._lock:
            self._delay[node] = seconds

    def cut(self, node: int, cut: bool = True) -> None:
        """Make `node` unreachable (True) or reachable again (False)."""
        with self._lock:
            (self._cut.add if cut else self._cut.discard)(node)

    def served(self, node: int) -> int:
        """Requests node `node` answered OK."""
        with self._lock:
            endpoint = self._nodes.get(node)
        return endpoint.served if endpoint is not None else 0

    def _register(self, node: int, endpoint: _Endpoint | None) -> None:
        with self._lock:
            old = self._nodes.pop(node, None)
            if endpoint is not None:
                self._nodes[node] = endpoint
        if old is not None:
            old.close()

    def _reach(self, node: int) -> tuple[_Endpoint | None, float]:
        """The endpoint of `node` (None when it is absent or cut) and its delay."""
        with self._lock:
            return (None if node in self._cut else self._nodes.get(node)), self._delay.get(node, 0.0)


class InProcessTransport:
    """Node `node`'s ends of a Fabric."""

    def __init__(self, fabric: Fabric, node: int):
        self.fabric, self.node = fabric, node
        self.max_chunk = fabric.max_chunk

    def serve(self, reader: Reader, writer: Writer) -> None:
        self.fabric._register(self.node, _Endpoint(self.node, reader, writer))

    def connect(self, node: int) -> BulkClient:
        return InProcessClient(self.fabric, node)

    def close(self) -> None:
        self.fabric._register(self.node, None)


class InProcessClient:
    """A BulkClient of one node of a Fabric; calls are serialized, like the ZeroMQ client's."""

    def __init__(self, fabric: Fabric, node: int):
        self.fabric, self.node = fabric, node
        self._lock = threading.Lock()
        self._closed = False

    def _call(self, op: str, key: Key, offset: int, length: int, timeout: float,
              data: memoryview | None = None) -> bytes:
        if self._closed:
            raise PeerUnavailable(f"bulk client for node {self.node} is closed")
        endpoint, delay = self.fabric._reach(self.node)
        unavailable = PeerUnavailable(f"peer node {self.node}: no reply to {op} {key} within {timeout:g}s")
        if endpoint is None:
            time.sleep(timeout)
            raise unavailable
        payload = bytes(data) if data is not None else b""  # the sender's buffer may change once we return
        try:
            future = endpoint.thread.submit(self._serve, endpoint, op, dict(key), offset, length, payload, delay)
        except RuntimeError:  # the node stopped serving meanwhile
            time.sleep(timeout)
            raise unavailable from None
        try:
            ok, out = future.result(timeout)
        except FutureTimeout:
            raise unavailable from None
        except CancelledError:  # the node stopped serving before it got to this request
            raise PeerUnavailable(f"peer node {self.node} stopped serving") from None
        if not ok:
            message = out.decode()
            raise PeerRejected(f"peer node {self.node}: {message}", message)
        return out

    def _serve(self, endpoint: _Endpoint, op: str, key: Key, offset: int, length: int, payload: bytes,
               delay: float) -> tuple[bool, bytes]:
        """Runs on the node's server thread: (True, reply data) or (False, error text)."""
        if delay > 0:
            time.sleep(delay)
        try:
            bulk.check_key(key)
            if offset < 0 or length < 0:
                raise BadKey("offset and length must be non-negative")
            if length > self.fabric.max_chunk:
                raise BadKey(f"length {length} exceeds this server's max_chunk {self.fabric.max_chunk}")
        except BadKey as exc:
            endpoint.refused += 1
            return False, f"bad request: {exc}".encode()
        try:
            if op == "GET":
                view = bulk.byte_view(endpoint.reader(key, offset, length))
                if view.nbytes != length:
                    raise ValueError(f"reader returned {view.nbytes} bytes for a request of {length}")
                out = bytes(view)
            else:
                endpoint.writer(key, offset, memoryview(payload))
                out = b""
        except Exception as exc:  # noqa: BLE001 - the contract: any refusal becomes PeerRejected
            endpoint.refused += 1
            return False, bulk.error_text(exc).encode(errors="replace")
        endpoint.served += 1
        return True, out

    def get(self, key: Key, offset: int, length: int, timeout: float) -> bytes:
        with self._lock:
            return self._call("GET", key, offset, length, timeout)

    def put(self, key: Key, offset: int, data: memoryview | bytes, timeout: float) -> None:
        view = bulk.byte_view(data)
        if view.nbytes > self.fabric.max_chunk:
            raise ValueError(f"put of {view.nbytes} bytes exceeds max_chunk {self.fabric.max_chunk}; use put_range")
        with self._lock:
            self._call("PUT", key, offset, view.nbytes, timeout, view)

    def get_range(self, key: Key, offset: int, length: int, into: memoryview | bytearray, timeout: float,
                  window: int = 4) -> None:
        view = bulk.byte_view(into)
        if view.readonly or view.nbytes < length:
            raise ValueError(f"`into` must be a writable buffer of at least {length} bytes")
        chunk = self.fabric.max_chunk
        with self._lock:
            for pos in range(0, length, chunk):
                n = min(chunk, length - pos)
                view[pos:pos + n] = self._call("GET", key, offset + pos, n, timeout)

    def put_range(self, key: Key, offset: int, data: memoryview | bytes, timeout: float, window: int = 4) -> None:
        view = bulk.byte_view(data)
        chunk = self.fabric.max_chunk
        with self._lock:
            for pos in range(0, view.nbytes, chunk):
                n = min(chunk, view.nbytes - pos)
                self._call("PUT", key, offset + pos, n, timeout, view[pos:pos + n])

    def close(self) -> None:
        self._closed = True
