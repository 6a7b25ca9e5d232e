"""Erasure-coding protection of sealed steps across the EC group (docs/ARCHITECTURE.md §5.4).

Each node coordinates one rotation per step (the one whose first parity node it is): it pulls
the k contributors' data chunks over the bulk transport, encodes m parity chunks stripe by
stripe, keeps parity 0, pushes parity j to parity node j, and sends the rotation record to every
group member. A step is *protected* once every rotation's parity nodes report their parity in
their heartbeat inventory. The newest protected step, the step being encoded and every step a
peer read recently stay pinned in the store, so eviction never breaks a protected step; so do
the steps other groups protect or encode (see ftd.daemon.peers), so one step stays restorable
on every rank of the job whichever group loses a node.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ftd._proto import peer_pb2 as pb
from ftd.codec import Codec, encode_striped
from ftd.config import DaemonConfig
from ftd.daemon import remote
from ftd.daemon.blob import NodeBlob
from ftd.daemon.groups import rotations
from ftd.daemon.parity import ParityStore, RotationRecord, stripe_checksums
from ftd.daemon.peers import HeartbeatLoop, Membership, PeerServer, PeerServicer, PeerTable
from ftd.daemon.store import SegmentStore
from ftd.daemon.links import PeerLink
from ftd.daemon.transport import BulkServer, curve_keys
from ftd.errors import FtdError
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

STRIPE_BYTES = 1 << 20
BATCH_BYTES = 16 << 20
SERVE_PIN_SECONDS = 60.0
SERVED_PINS = 3  # a peer reads the steps it encodes or fetches: keep the most recently read few sealed
TRANSFER_TIMEOUT = 30.0
"""Longest stall of a bulk transfer; protection uses the peer timeout when it is shorter."""
UNPROTECTED_KEPT = 4  # steps above the protected one whose parity and records are kept


def parity_steps_to_keep(protected: int, on_disk: set[int]) -> set[int]:
    """The protected step and the few newest steps above it.

    Steps above it are kept whether or not any inventory mentions them yet: a rotation record can
    arrive before its coordinator's next heartbeat, and dropping it then leaves that rotation
    without a record on every other node once the step becomes protected.
    """
    return {protected, *sorted(s for s in on_disk if s > protected)[-UNPROTECTED_KEPT:]}


def chunk_bytes(max_blob: int, k: int) -> int:
    """Bytes per chunk for a group whose largest blob is `max_blob`: a whole number of stripes."""
    per = max(1, math.ceil(max_blob / k))
    stripe = min(STRIPE_BYTES, _pow2_at_least(per, 4096))
    return math.ceil(per / stripe) * stripe


def stripe_for(chunk: int) -> int:
    return min(STRIPE_BYTES, chunk)


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


class Protector:
    """Peers, bulk transport, encoding loop and (via ftd.daemon.rebuild) rebuild of this node."""

    def __init__(self, config: DaemonConfig, membership: Membership, store: SegmentStore, codec: Codec,
                 metrics: DaemonMetrics):
        self.config, self.membership, self.store, self.codec, self.metrics = config, membership, store, codec, metrics
        self.group = membership.group
        self.parity = ParityStore(store.root, admit=self._admit_parity, mode=store.dir_mode)
        store.count_external(self.parity.held_bytes)  # the memory budget covers segments and parity alike
        self.incarnation = secrets.randbits(63)
        self.table = PeerTable(membership, metrics, config.peer_timeout)
        self.keys = curve_keys(config.cluster_token)
        self.protected_step = max(self._own_protected_candidates(), default=-1)
        self.ready = threading.Event()
        self.rebuilding = store.is_empty()  # until the rebuild check has run, an empty node holds nothing
        self._encoding: int | None = None
        self._last_encoded = -1
        self._served: dict[int, float] = {}
        self._outside_pins: set[int] = set()
        self._blobs: dict[tuple[Any, ...], NodeBlob] = {}
        self._lock = threading.Lock()
        self._links: dict[int, PeerLink] = {}
        self._stop = threading.Event()
        grpc_addr, data_addr = membership.listen_addresses(config.listen)
        self.bulk = BulkServer(data_addr, self.keys, self._read, self._write,
                               on_error=lambda: metrics.thread_errors.labels("ftd-bulk-server").inc())
        try:
            self.peer_server = PeerServer(grpc_addr, PeerServicer(membership, self.table, config.job, self.inventory),
                                          config.cluster_token, config.job, metrics)
        except BaseException:
            self.bulk.close()  # the bulk port is free again for the next start
            raise
        self.heartbeat = HeartbeatLoop(membership, self.table, config.cluster_token, config.job,
                                       config.heartbeat_interval, self.inventory)
        self._thread = threading.Thread(target=self._run, name="ftd-protect", daemon=True)

    def start(self) -> Protector:
        self._update_pins()  # a restarted daemon keeps the protected step it re-adopted
        self.heartbeat.start()
        self._thread.start()
        g = self.group
        log.info("node %d in EC group %d %s (%d+%d, codec %s); newest protected step %d", self.membership.me,
                 g.index, list(g.members), g.k, g.m, self.codec.name, self.protected_step)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.heartbeat.stop()
        self.peer_server.stop()
        self.bulk.close()
        for link in self._links.values():
            link.close()
        with self._lock:
            for blob in self._blobs.values():
                blob.close()
        self.parity.close()

    # ---- inventory ----------------------------------------------------------------------------

    def inventory(self) -> pb.Inventory:
        held = set(self._complete_steps())
        if self.ready.is_set() and self.protected_step >= 0 and self.store.blob_parts(self.protected_step):
            held.add(self.protected_step)  # servable even after the ranks here changed
        steps = []
        for s in sorted(held):
            try:
                steps.append(pb.StepData(step=s, blob_bytes=self._blob(s, pin=False).size))
            except KeyError:  # evicted since it was listed: not held any more, so not announced
                continue
        parity = [pb.ParityHeld(step=s, rotation=r, j=j, chunk_bytes=n) for s, r, j, n in self.parity.held()]
        ranks = [r.rank for r in self.store.summary()]
        encoding = self._encoding
        return pb.Inventory(job=self.config.job, node=self.membership.me, incarnation=self.incarnation, steps=steps,
                            parity=parity, protected_step=self.protected_step, rebuilding=self.rebuilding,
                            ranks=ranks, encoding_step=-1 if encoding is None else encoding)

    def _complete_steps(self) -> list[int]:
        return sorted(self.store.complete_steps()) if self.ready.is_set() else []

    def _own_protected_candidates(self) -> list[int]:
        # Not any step with a record: a step some coordinators never encoded is not protected.
        return sorted(self.parity.whole_steps(self.group.size))

    # ---- serving peers ------------------------------------------------------------------------

    def pin_served(self, step: int) -> None:
        """Keep `step` sealed for a while: a peer is reading it."""
        self._served[step] = time.monotonic()
        self._update_pins()

    def _blob(self, step: int, pin: bool = True) -> NodeBlob:
        if pin:
            self.pin_served(step)
        parts = self.store.blob_parts(step)
        if not parts:
            raise KeyError(f"node {self.membership.me} holds no data of step {step}")
        # Keyed by the exact segments: a slot reused for another step must never be read as this one.
        signature = (step, tuple((rank, path, hash(manifest)) for rank, path, _, manifest in parts))
        with self._lock:
            blob = self._blobs.get(signature)
            if blob is None:
                blob = self._blobs[signature] = NodeBlob(step, self.membership.me, parts)
            return blob

    def _read(self, key: dict[str, Any], offset: int, length: int) -> bytes:
        kind = key.get("kind")
        if kind == "data":
            chunk, size = int(key["chunk"]), int(key["C"])
            if offset + length > size:
                raise ValueError(f"read past the chunk size {size}")
            data = self._blob(int(key["step"])).read(chunk * size + offset, length)
        elif kind == "parity":
            data = self.parity.read(int(key["step"]), int(key["rot"]), int(key["j"]), offset, length)
        elif kind == "record_size":
            data = b"%16d" % len(self.parity.record(int(key["step"]), int(key["rot"])).to_json())
        elif kind == "record":
            data = self.parity.record(int(key["step"]), int(key["rot"])).to_json()[offset:offset + length]
        elif kind in ("segment_manifest_size", "segment_manifest", "segment_size", "segment"):
            data = remote.serve(self, key, offset, length)
        else:
            raise KeyError(f"unknown kind {kind!r}")
        self.metrics.peer_sent_bytes.labels(self._peer_label(key)).inc(len(data))
        return data

    def _write(self, key: dict[str, Any], offset: int, data: memoryview) -> None:
        kind = key.get("kind")
        self.metrics.peer_received_bytes.labels(self._peer_label(key)).inc(len(data))
        if kind == "parity":
            step, rot, j, size = int(key["step"]), int(key["rot"]), int(key["j"]), int(key["size"])
            if not 0 <= rot < self.group.size or not 0 < j < self.group.m:
                raise ValueError(f"parity rotation {rot} j {j} is outside group {list(self.group.members)}")
            limit = self.parity_limit(step)
            if not 0 < size <= limit:
                raise ValueError(f"parity chunk of {size} bytes for step {step}: the group's blobs imply at most "
                                 f"{limit}")
            self.parity.write(step, rot, j, size, offset, data)
        elif kind == "record":
            record = RotationRecord.from_json(bytes(data))
            self._accept_record(record)
        else:
            raise KeyError(f"unknown kind {kind!r}")

    def _accept_record(self, record: RotationRecord) -> None:
        if record.members != list(self.group.members):
            raise ValueError(f"record for group {record.members}, this node is in {list(self.group.members)}")
        self.parity.put_record(record)
        position = self.membership.position
        if position in record.parity:
            j = record.parity.index(position)
            if self.parity.seal(record.step, record.rotation, j):
                log.debug("holding parity %d of step %d rotation %d", j, record.step, record.rotation)

    def parity_limit(self, step: int) -> int:
        """Largest parity chunk the group's authenticated blob sizes imply for `step` (0: none known).

        The step's own sizes when any inventory announces it; otherwise the largest blob any group
        inventory announces (a heartbeat may lag the coordinator's PUT by one interval)."""
        invs = self.table.inventories()
        own = self._complete_steps()
        sizes: list[int] = []
        for s in own:
            try:
                sizes.append(self._blob(s, pin=False).size)
            except KeyError:
                continue
        announced = [d.blob_bytes for inv in invs.values() for d in inv.steps]
        this_step = [d.blob_bytes for inv in invs.values() for d in inv.steps if d.step == step]
        biggest = max(this_step or [*announced, *sizes], default=0)
        return chunk_bytes(biggest, self.group.k) if biggest else 0

    def _admit_parity(self, nbytes: int) -> None:
        """Refuse a parity allocation that would take segments plus parity over the memory budget, or
        leave the host under the memory reserve (what the store enforces for segments)."""
        if nbytes <= 0:
            return
        reserve = self.config.memory_reserve
        if reserve > 0:
            import psutil

            available = psutil.virtual_memory().available
            if available - nbytes < reserve:
                self.metrics.refused.labels("parity_reserve").inc()
                raise FtdError(f"parity of {nbytes} bytes would leave {available - nbytes} bytes of host memory "
                               f"available, under the reserve of {reserve}")
        budget = self.config.memory_budget
        if budget <= 0:
            return
        held = self.store.held_bytes() + self.parity.held_bytes()
        if held + nbytes > budget:
            self.metrics.refused.labels("parity_budget").inc()
            raise FtdError(f"parity of {nbytes} bytes would exceed the memory budget ({held} of {budget} bytes held "
                           f"in segments and parity)")

    def transfer_timeout(self) -> float:
        """Longest stall of one bulk transfer of protection: a dead peer costs at most the peer timeout."""
        return min(TRANSFER_TIMEOUT, max(1.0, self.config.peer_timeout))

    # ---- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        from ftd.daemon.rebuild import Rebuilder

        try:
            if self.store.is_empty():
                Rebuilder(self).run()
        except Exception:  # noqa: BLE001 - a failed rebuild must not end protection
            self.metrics.thread_errors.labels("ftd-rebuild").inc()
            log.exception("rebuild failed; this node starts protecting what it holds from now on")
            self.rebuilding = False
        self.ready.set()
        last_error = ""
        while not self._stop.wait(0.2):
            try:
                self._tick()
                last_error = ""
            except Exception as exc:  # a daemon thread must survive anything a peer sends
                message = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, FtdError):
                    self.metrics.thread_errors.labels("ftd-protect").inc()
                if message != last_error:  # once per distinct failure, not five times a second
                    log.warning("protection: %s", message, exc_info=not isinstance(exc, FtdError))
                last_error = message

    def _tick(self) -> None:
        self.metrics.parity_held_bytes.set(self.parity.held_bytes())
        if self.table.other_groups_steps() != self._outside_pins:
            self._update_pins()
        newest = self._follow_timeline()
        invs = self.table.inventories()
        invs[self.membership.me] = self.inventory()
        self._update_protected(invs)
        if len(invs) < self.group.size:
            return
        common = set.intersection(*({s.step for s in inv.steps} for inv in invs.values()))
        candidates = [s for s in common if s > self._last_encoded and s > self.protected_step
                      and (newest is None or s <= newest)]
        if not candidates:
            return
        step = max(candidates)
        self._encoding = step
        self._update_pins()
        try:
            self.encode(step, {n: next(s.blob_bytes for s in inv.steps if s.step == step) for n, inv in invs.items()})
        finally:
            self._last_encoded = step
            self._encoding = None

    def _follow_timeline(self) -> int | None:
        """Notice training going back below the protected step; return the newest sealed step.

        A restore to an older step (or a fresh start when nothing was usable) begins a new timeline:
        its steps are numbered below the protected one yet are the newer state. The old timeline's
        protection is dropped and the new steps are protected from then on; steps numbered above
        the newest seal are never encoded again.
        """
        newest = self.store.newest_sealed_step()
        if newest is None or self.protected_step < 0 or newest >= self.protected_step or self.rebuilding:
            return newest
        log.warning("training went back to step %d, below the protected step %d (a restore to an older step or "
                    "a fresh start): protecting the new timeline from now on", newest, self.protected_step)
        self.protected_step = self._last_encoded = -1
        self.metrics.protected_step.set(-1)
        self.metrics.group_protected.set(0)
        self.parity.drop_except({s for s in self.parity.steps() if s <= newest})
        self._update_pins()
        return newest

    def _update_protected(self, invs: dict[int, pb.Inventory]) -> None:
        g = self.group
        held = {n: {(p.step, p.rotation, p.j) for p in inv.parity} for n, inv in invs.items()}
        steps = set.union(set(), *({p.step for p in inv.parity} for inv in invs.values()))
        protected = self.protected_step
        for step in sorted(steps):
            if step <= protected:
                continue
            if all((step, rot.r, j) in held.get(g.members[pos], set())
                   for rot in rotations(g.size, g.m) for j, pos in enumerate(rot.parity)):
                protected = step
        if protected != self.protected_step:
            log.info("group %d: step %d is protected", g.index, protected)
            self.protected_step = protected
            self.metrics.protected_step.set(protected)
            self.metrics.group_protected.set(1)
            self._update_pins()
            self.parity.drop_except(parity_steps_to_keep(protected, self.parity.steps()))

    def _update_pins(self) -> None:
        now = time.monotonic()
        served = dict(self._served)  # bulk-server threads add to it meanwhile
        recent = sorted(served, key=lambda step: served[step], reverse=True)[:SERVED_PINS]
        for step, at in served.items():
            if now - at > SERVE_PIN_SECONDS or step not in recent:
                self._served.pop(step, None)
        self._outside_pins = self.table.other_groups_steps()
        pins = {self.protected_step, *self._served, *self._outside_pins}
        if self._encoding is not None:
            pins.add(self._encoding)
        self.store.pin({p for p in pins if p >= 0})
        with self._lock:
            for signature in [s for s in self._blobs if s[0] not in pins]:
                self._blobs.pop(signature).close()

    # ---- encoding -----------------------------------------------------------------------------

    def client(self, node: int) -> PeerLink:
        if node not in self._links:
            self._links[node] = PeerLink(self.membership.me, node, self.membership.data_endpoint(node), self.keys,
                                         self.metrics)
        return self._links[node]

    def _peer_label(self, key: dict[str, Any]) -> str:
        sender = key.get("from")
        return str(sender) if isinstance(sender, int) and sender in self.group.members else "unknown"

    def encode(self, step: int, blob_sizes: dict[int, int]) -> None:
        """Encode this node's rotation of `step` and distribute parity and the record."""
        g, me = self.group, self.membership.position
        rot = rotations(g.size, g.m)[me]
        size = chunk_bytes(max(blob_sizes.values()), g.k)
        stripe = stripe_for(size)
        timeout = self.transfer_timeout()
        t0 = time.perf_counter()
        local = self.parity.create(step, rot.r, 0, size)
        sums: list[list[int]] = [[] for _ in range(g.k + g.m)]
        with ThreadPoolExecutor(max_workers=g.k, thread_name_prefix="ftd-encode") as pool:
            for start in range(0, size, BATCH_BYTES):
                n = min(BATCH_BYTES, size - start)
                bufs = [bytearray(n) for _ in range(g.k)]

                def fetch(i: int) -> None:
                    pos, chunk_no = rot.data[i]
                    key = {"kind": "data", "step": step, "chunk": chunk_no, "C": size}
                    self.client(g.members[pos]).get_range(key, start, n, memoryview(bufs[i]), timeout)

                list(pool.map(fetch, range(g.k)))
                parity = encode_striped(self.codec, bufs, stripe)
                for i, buf in enumerate([*bufs, *parity]):
                    sums[i].extend(stripe_checksums(buf, stripe))
                local[start:start + n] = parity[0]
                for j in range(1, g.m):
                    key = {"kind": "parity", "step": step, "rot": rot.r, "j": j, "size": size}
                    self.client(g.members[rot.parity[j]]).put_range(key, start, memoryview(parity[j]), timeout)
        record = RotationRecord(step, rot.r, self.codec.name, g.k, g.m, size, stripe, list(g.members),
                                [list(d) for d in rot.data], list(rot.parity), sums)
        raw = record.to_json()
        for node in g.members:
            if node == self.membership.me:
                self._accept_record(record)
            else:
                self.client(node).put({"kind": "record", "step": step, "rot": rot.r}, 0, memoryview(raw), timeout)
        seconds = time.perf_counter() - t0
        self.metrics.ec_encode_seconds.observe(seconds)
        self.metrics.ec_encode_bytes.inc(size * g.k)
        log.info("encoded step %d rotation %d: %d x %d bytes in %.2f s", step, rot.r, g.k, size, seconds)
