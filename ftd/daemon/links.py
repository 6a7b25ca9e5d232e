"""A daemon's bulk link to one peer: the transport client plus who-is-asking and byte accounting."""

from __future__ import annotations

from typing import Any

from ftd.daemon.transport import BulkClient, CurveKeys
from ftd.metrics import DaemonMetrics


class PeerLink:
    """Bulk GET/PUT to one peer. Every key carries `from` (this node) so the peer can label its metrics."""

    def __init__(self, me: int, peer: int, endpoint: str, keys: CurveKeys, metrics: DaemonMetrics):
        self.me, self.peer = me, peer
        self.client = BulkClient(endpoint, keys)
        self._sent = metrics.peer_sent_bytes.labels(str(peer))
        self._received = metrics.peer_received_bytes.labels(str(peer))

    def _key(self, key: dict[str, Any]) -> dict[str, Any]:
        return {**key, "from": self.me}

    def get(self, key: dict[str, Any], offset: int, length: int, timeout: float) -> bytes | memoryview:
        data = self.client.get(self._key(key), offset, length, timeout)
        self._received.inc(len(data))
        return data

    def get_range(self, key: dict[str, Any], offset: int, length: int, into: memoryview, timeout: float) -> None:
        self.client.get_range(self._key(key), offset, length, into, timeout)
        self._received.inc(length)

    def put(self, key: dict[str, Any], offset: int, data: memoryview, timeout: float) -> None:
        self.client.put(self._key(key), offset, data, timeout)
        self._sent.inc(len(data))

    def put_range(self, key: dict[str, Any], offset: int, data: memoryview, timeout: float) -> None:
        self.client.put_range(self._key(key), offset, data, timeout)
        self._sent.inc(len(data))

    def close(self) -> None:
        self.client.close()
