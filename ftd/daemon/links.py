"""A daemon's bulk links to its peers: one client per peer, who-is-asking and byte accounting."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ftd.daemon.bulk import BulkClient, Key
from ftd.metrics import DaemonMetrics


class PeerLink:
    """Bulk GET/PUT to one peer. Every key carries `from` (this node) so the peer can label its metrics."""

    def __init__(self, me: int, peer: int, client: BulkClient, metrics: DaemonMetrics):
        self.me, self.peer, self.client = me, peer, client
        self._sent = metrics.peer_sent_bytes.labels(str(peer))
        self._received = metrics.peer_received_bytes.labels(str(peer))

    def _key(self, key: Key) -> Key:
        return {**key, "from": self.me}

    def get(self, key: Key, offset: int, length: int, timeout: float) -> bytes | memoryview:
        data = self.client.get(self._key(key), offset, length, timeout)
        self._received.inc(len(data))
        return data

    def get_range(self, key: Key, offset: int, length: int, into: memoryview | bytearray, timeout: float) -> None:
        self.client.get_range(self._key(key), offset, length, into, timeout)
        self._received.inc(length)

    def put(self, key: Key, offset: int, data: memoryview | bytes, timeout: float) -> None:
        self.client.put(self._key(key), offset, data, timeout)
        self._sent.inc(len(data))

    def put_range(self, key: Key, offset: int, data: memoryview | bytes, timeout: float) -> None:
        self.client.put_range(self._key(key), offset, data, timeout)
        self._sent.inc(len(data))

    def close(self) -> None:
        self.client.close()


class Links:
    """One PeerLink per peer, made on first use; safe to use from any thread."""

    def __init__(self, me: int, connect: Callable[[int], BulkClient], metrics: DaemonMetrics):
        self.me, self._connect, self._metrics = me, connect, metrics
        self._links: dict[int, PeerLink] = {}
        self._lock = threading.Lock()

    def __call__(self, node: int) -> PeerLink:
        with self._lock:
            link = self._links.get(node)
            if link is None:
                link = self._links[node] = PeerLink(self.me, node, self._connect(node), self._metrics)
            return link

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
