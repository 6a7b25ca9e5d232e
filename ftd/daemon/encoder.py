"""Encoding of one rotation of a step (docs/ARCHITECTURE.md §5.4).

The rotation's coordinator pulls the k contributors' data chunks over the bulk plane, encodes m
parity chunks stripe by stripe, keeps parity 0, pushes parity j to parity node j, and sends the
rotation record (with every piece's stripe checksums) to every group member.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ftd import knobs
from ftd.codec import Codec, encode_striped
from ftd.daemon.bulkmsg import DataChunk, ParityChunk, Record
from ftd.daemon.groups import Group, rotations
from ftd.daemon.links import PeerLink
from ftd.daemon.parity import ParityStore, RotationRecord, stripe_checksums
from ftd.daemon.serving import chunk_bytes, stripe_for
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)


class Encoder:
    """Encodes this node's rotation of a step and distributes its parity and record."""

    def __init__(self, me: int, group: Group, codec: Codec, parity: ParityStore, links: Callable[[int], PeerLink],
                 metrics: DaemonMetrics, *, accept_record: Callable[[RotationRecord], None],
                 timeout: Callable[[], float]):
        self.me, self.group, self.codec, self.parity, self.links = me, group, codec, parity, links
        self.metrics, self._accept_record, self._timeout = metrics, accept_record, timeout

    def encode(self, step: int, blob_sizes: dict[int, int]) -> RotationRecord:
        """Encode this node's rotation of `step` (whose blobs have `blob_sizes`); return its record."""
        g = self.group
        rot = rotations(g.size, g.m)[g.position(self.me)]
        size = chunk_bytes(max(blob_sizes.values()), g.k)
        stripe = stripe_for(size)
        timeout = self._timeout()
        batch = knobs.get().encode_batch_bytes
        t0 = time.perf_counter()
        local = self.parity.create(step, rot.r, 0, size)
        sums: list[list[int]] = [[] for _ in range(g.k + g.m)]
        with ThreadPoolExecutor(max_workers=g.k, thread_name_prefix="ftd-encode") as pool:
            for start in range(0, size, batch):
                n = min(batch, size - start)
                bufs = [bytearray(n) for _ in range(g.k)]

                def fetch(i: int) -> None:
                    pos, chunk_no = rot.data[i]
                    key = DataChunk(step, chunk_no, size).key()
                    self.links(g.members[pos]).get_range(key, start, n, memoryview(bufs[i]), timeout)

                list(pool.map(fetch, range(g.k)))
                parity = encode_striped(self.codec, bufs, stripe)
                for i, buf in enumerate([*bufs, *parity]):
                    sums[i].extend(stripe_checksums(buf, stripe))
                local[start:start + n] = parity[0]
                for j in range(1, g.m):
                    key = ParityChunk(step, rot.r, j, size).key()
                    self.links(g.members[rot.parity[j]]).put_range(key, start, memoryview(parity[j]), timeout)
        record = RotationRecord(step, rot.r, self.codec.name, g.k, g.m, size, stripe, list(g.members),
                                [list(d) for d in rot.data], list(rot.parity), sums)
        raw = record.to_json()
        for node in g.members:
            if node == self.me:
                self._accept_record(record)
            else:
                self.links(node).put(Record(step, rot.r).key(), 0, memoryview(raw), timeout)
        seconds = time.perf_counter() - t0
        self.metrics.ec_encode_seconds.observe(seconds)
        self.metrics.ec_encode_bytes.inc(size * g.k)
        log.info("encoded step %d rotation %d: %d x %d bytes in %.2f s", step, rot.r, g.k, size, seconds)
        return record
