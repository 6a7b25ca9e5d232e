"""What a node serves its group peers over the bulk plane: the reader and writer of ftd.daemon.bulk.

Reads: data chunks of this node's blob of a step, parity chunks, rotation records, a rank's
sealed segment with its manifest (for a rank that moved to another node, or byte ranges of it
for a reshard), what this node holds (`Holdings`) and the state of a lost member's adoption
(`Adopt`, which starts it: ftd.daemon.adoption). Writes: parity chunks
pushed by a rotation's coordinator and rotation records. Every request is a typed message of
ftd.daemon.bulkmsg; anything else is refused.

State owned here, each under its own lock: the cache of open node blobs (a blob is read and
closed under the cache lock, so closing one never races a read) and the steps peers read
recently, which stay pinned in the store (pin owner "peer-reads") for `served_pin_seconds`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

from ftd import knobs
from ftd.daemon import bulkmsg
from ftd.daemon.blob import NodeBlob
from ftd.daemon.bulk import Key
from ftd.daemon.bulkmsg import Adopt, DataChunk, Holdings, ParityChunk, Record, Segment, SegmentManifest
from ftd.daemon.groups import Group
from ftd.daemon.parity import ParityStore, RotationRecord
from ftd.daemon.peers import PeerTable
from ftd.daemon.store import SegmentStore
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

PIN_OWNER = "peer-reads"


def chunk_bytes(max_blob: int, k: int) -> int:
    """Bytes per chunk for a group whose largest blob is `max_blob`: a whole number of stripes."""
    per = max(1, -(-max_blob // k))
    stripe = min(knobs.get().stripe_bytes, _pow2_at_least(per, 4096))
    return -(-per // stripe) * stripe


def stripe_for(chunk: int) -> int:
    """The stripe of a chunk of `chunk` bytes."""
    return min(knobs.get().stripe_bytes, chunk)


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


class ServedPins:
    """Steps peers read recently: the newest few stay pinned for a while. Thread-safe."""

    def __init__(self, store: SegmentStore):
        self.store = store
        self._read_at: dict[int, float] = {}
        self._lock = threading.Lock()

    def touch(self, step: int) -> None:
        """A peer is reading `step`: keep it sealed."""
        with self._lock:
            self._read_at[step] = time.monotonic()
            steps = self._prune()
        self.store.pin(steps, owner=PIN_OWNER)

    def steps(self) -> set[int]:
        """The steps pinned for peers now."""
        with self._lock:
            steps = self._prune()
        self.store.pin(steps, owner=PIN_OWNER)
        return steps

    def _prune(self) -> set[int]:
        k = knobs.get()
        now = time.monotonic()
        recent = sorted(self._read_at, key=self._read_at.__getitem__, reverse=True)[:k.served_pins]
        self._read_at = {s: self._read_at[s] for s in recent if now - self._read_at[s] <= k.served_pin_seconds}
        return set(self._read_at)


class BulkService:
    """The reader and writer a node's bulk server calls (one request at a time)."""

    def __init__(self, me: int, group: Group, position: int, store: SegmentStore, parity: ParityStore,
                 table: PeerTable, metrics: DaemonMetrics, *, own_steps: Callable[[], list[int]],
                 accept_record: Callable[[RotationRecord], None],
                 adopt: Callable[[str, int, int], bytes] | None = None):
        self.me, self.group, self.position = me, group, position
        self.store, self.parity, self.table, self.metrics = store, parity, table, metrics
        self._own_steps, self._accept_record, self._adopt = own_steps, accept_record, adopt
        self.served = ServedPins(store)
        self._blobs: dict[tuple, NodeBlob] = {}
        self._lock = threading.Lock()

    # ---- node blobs ---------------------------------------------------------------------------

    def _signature(self, step: int) -> tuple:
        parts = self.store.blob_parts(step)
        if not parts:
            raise KeyError(f"node {self.me} holds no data of step {step}")
        # Keyed by the exact segments: a slot reused for another step must never be read as this one.
        return (step, tuple((rank, path, hash(manifest)) for rank, path, _, manifest in parts)), parts

    def _blob(self, step: int) -> NodeBlob:
        """The open blob of `step` (call with the lock held)."""
        signature, parts = self._signature(step)
        blob = self._blobs.get(signature)
        if blob is None:
            blob = self._blobs[signature] = NodeBlob(step, self.me, parts)
        return blob

    def blob_size(self, step: int) -> int:
        """Bytes of this node's blob of `step`; KeyError when it holds no data of it."""
        with self._lock:
            return self._blob(step).size

    def read_blob(self, step: int, offset: int, length: int) -> bytes:
        """Bytes of this node's blob of `step` (pins it for peers)."""
        self.served.touch(step)
        with self._lock:
            return self._blob(step).read(offset, length)

    def release_blobs(self, keep: set[int]) -> None:
        """Close the cached blobs of steps neither in `keep` nor read by peers lately."""
        keep = keep | self.served.steps()
        with self._lock:
            for signature in [s for s in self._blobs if s[0] not in keep]:
                self._blobs.pop(signature).close()

    def close(self) -> None:
        with self._lock:
            for blob in self._blobs.values():
                blob.close()
            self._blobs.clear()

    # ---- limits -------------------------------------------------------------------------------

    def parity_limit(self, step: int) -> int:
        """Largest parity chunk the group's authenticated blob sizes imply for `step` (0: none known).

        The step's own sizes when any inventory announces it; otherwise the largest blob any group
        inventory announces (a heartbeat may lag the coordinator's PUT by one interval)."""
        invs = self.table.inventories()
        sizes: list[int] = []
        for s in self._own_steps():
            try:
                sizes.append(self.blob_size(s))
            except KeyError:
                continue
        announced = [d.blob_bytes for inv in invs.values() for d in inv.steps]
        this_step = [d.blob_bytes for inv in invs.values() for d in inv.steps if d.step == step]
        biggest = max(this_step or [*announced, *sizes], default=0)
        return chunk_bytes(biggest, self.group.k) if biggest else 0

    # ---- the reader and the writer ------------------------------------------------------------

    def _peer_label(self, key: Key) -> str:
        sender = bulkmsg.sender(key)
        return str(sender) if isinstance(sender, int) and sender in self.group.members else "unknown"

    def read(self, key: Key, offset: int, length: int) -> bytes:
        message, sized = bulkmsg.parse(key)
        if isinstance(message, DataChunk):
            if offset + length > message.chunk_bytes:
                raise ValueError(f"read past the chunk size {message.chunk_bytes}")
            data = self.read_blob(message.step, message.chunk * message.chunk_bytes + offset, length)
        elif isinstance(message, ParityChunk):
            data = self.parity.read(message.step, message.rot, message.j, offset, length)
        elif isinstance(message, Record):
            raw = self.parity.record(message.step, message.rot).to_json()
            data = bulkmsg.serve_sized(len(raw), lambda o, n: raw[o:o + n], sized, offset, length)
        elif isinstance(message, Holdings):
            if message.job != self.store.config.job:
                raise KeyError(f"this node serves job {self.store.config.job!r}, not {message.job!r}")
            doc = json.dumps({"holdings": [[h.rank, h.step, h.world_size, h.source, h.data_bytes]
                                           for h in self.store.holdings()]}).encode()
            data = bulkmsg.serve_padded(doc, offset, length)
        elif isinstance(message, Adopt):
            if self._adopt is None:
                raise KeyError("this node does not decode lost members")
            data = bulkmsg.serve_padded(self._adopt(message.job, message.step, message.node), offset, length)
        else:
            data = self._serve_segment(message, sized, offset, length)
        self.metrics.peer_sent_bytes.labels(self._peer_label(key)).inc(len(data))
        return data

    def _serve_segment(self, message: Segment | SegmentManifest, sized: bool, offset: int, length: int) -> bytes:
        self.served.touch(message.step)
        if isinstance(message, SegmentManifest):
            _, _, manifest, _ = self.store.open(message.job, message.rank, message.step)
            return bulkmsg.serve_sized(len(manifest), lambda o, n: manifest[o:o + n], sized, offset, length)
        path, nbytes = self.store.data_of(message.job, message.rank, message.step)

        def read(o: int, n: int) -> bytes:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                return os.pread(fd, n, o)
            finally:
                os.close(fd)

        return bulkmsg.serve_sized(nbytes, read, sized, offset, length)

    def write(self, key: Key, offset: int, data: memoryview) -> None:
        message, sized = bulkmsg.parse(key)
        self.metrics.peer_received_bytes.labels(self._peer_label(key)).inc(len(data))
        if isinstance(message, ParityChunk) and not sized:
            g = self.group
            if not 0 <= message.rot < g.size or not 0 < message.j < g.m:
                raise ValueError(f"parity rotation {message.rot} j {message.j} is outside group {list(g.members)}")
            limit = self.parity_limit(message.step)
            if not 0 < message.size <= limit:
                raise ValueError(f"parity chunk of {message.size} bytes for step {message.step}: the group's blobs "
                                 f"imply at most {limit}")
            self.parity.write(message.step, message.rot, message.j, message.size, offset, data)
        elif isinstance(message, Record) and not sized:
            self._accept_record(RotationRecord.from_json(bytes(data)))
        else:
            raise KeyError(f"unknown kind {key.get('kind')!r} for a write")
