"""Rebuild of a node that lost its memory, from the k surviving pieces of every rotation.

A daemon that starts with an empty store while its group peers report a protected step is a
replacement: it fetches the rotation records, pulls for each rotation any k intact pieces
(every piece is checked against the record's stripe checksums; a bad one is logged, counted and
replaced by another survivor's), decodes its own data chunks and parity chunks, turns the data
back into per-rank sealed segments (each verified against its manifest) and serves its restarted
ranks like a local restore. When fewer than k pieces survive it says which group lost which
nodes and gives up at once: memory cannot recover that.

The same decoding serves a lost node that is *not* replaced (ftd.daemon.adoption): a survivor
decodes the lost member's data chunks of one step (`target`), reading its own pieces through a
local link, and seals the lost ranks' segments in its own store as ADOPTED.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ftd import knobs
from ftd._proto import peer_pb2 as pb
from ftd.codec import Codec, decode_striped
from ftd.daemon.blob import MAX_HEADER_BYTES, BlobPart, parse_header
from ftd.daemon.bulkmsg import DataChunk, ParityChunk, Record, read_sized
from ftd.daemon.groups import Group, rotations
from ftd.daemon.links import PeerLink
from ftd.daemon.parity import ParityStore, RotationRecord, stripe_checksums
from ftd.daemon.peers import PeerTable
from ftd.daemon.slots import Source
from ftd.daemon.store import PendingInstall, SegmentStore
from ftd.errors import FtdError, ManifestError, SnapshotCorrupt
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)


class Unrecoverable(FtdError):
    """More than m nodes of a group lost their memory."""


def _candidate_steps(invs: dict[int, pb.Inventory]) -> list[int]:
    """Steps worth trying, newest first: every protected step the peers report and every step they
    hold parity of at or below the newest protected one (older ones survive a lost record)."""
    newest = max((inv.protected_step for inv in invs.values()), default=-1)
    if newest < 0:
        return []
    steps = {inv.protected_step for inv in invs.values() if inv.protected_step >= 0}
    steps |= {p.step for inv in invs.values() for p in inv.parity if p.step <= newest}
    return sorted(steps, reverse=True)


def _holds(inv: pb.Inventory | None, step: int) -> bool:
    """Whether a peer's inventory shows any data or parity of `step`."""
    return inv is not None and (any(s.step == step for s in inv.steps) or any(p.step == step for p in inv.parity))


@dataclass(frozen=True)
class RebuildInputs:
    """What a rebuild reads and writes: the group, the peers, this node's stores."""

    me: int
    group: Group
    codec: Codec
    table: PeerTable
    links: Callable[[int], PeerLink]
    store: SegmentStore
    parity: ParityStore
    metrics: DaemonMetrics
    wait_seconds: float
    """How long to wait for the group's peers to answer before deciding."""
    timeout: Callable[[], float]
    """Longest stall of one bulk transfer."""


@dataclass(frozen=True)
class Rebuilt:
    """A completed rebuild: the step this node holds again and the rotation records it got."""

    step: int
    records: tuple[RotationRecord, ...]
    data_bytes: int = 0
    """Bytes of rank data sealed."""


class Rebuilder:
    """One rebuild attempt of a node that lost its memory. It changes only this node's stores;
    the caller adopts the result (its records and protected step).

    With `target` (another member of the group) it decodes that node's data instead, as segments
    of `source` (ADOPTED), and leaves its parity alone (`adopt_step`).
    """

    def __init__(self, inputs: RebuildInputs, target: int | None = None, source: Source = Source.REBUILT):
        self.p = inputs
        self.group = inputs.group
        self.me = inputs.me if target is None else target
        self.source = source
        self._data_only = target is not None and target != inputs.me

    def run(self) -> Rebuilt | None:
        """Rebuild if the group holds a protected step; the result when this node now holds it."""
        metrics = self.p.metrics
        try:
            invs = self._wait_for_peers()
            candidates = _candidate_steps(invs)
            if not candidates:
                log.info("no protected step in group %d: nothing to rebuild", self.group.index)
                metrics.rebuilds.labels("nothing").inc()
                return None
            unrecoverable = False
            for step in candidates:
                try:
                    result = self._rebuild(step, invs)
                    metrics.rebuilds.labels("rebuilt").inc()
                    metrics.rebuilt_step.set(step)
                    return result
                except FtdError as exc:
                    unrecoverable = unrecoverable or isinstance(exc, Unrecoverable)
                    log.error("rebuild of node %d step %d failed: %s", self.me, step, exc)
            log.error("memory cannot recover node %d's snapshots: none of the steps %s the group holds parity for "
                      "could be rebuilt", self.me, candidates)
            metrics.rebuilds.labels("unrecoverable" if unrecoverable else "failed").inc()
            return None
        finally:
            metrics.rebuild_progress.set(0)

    def adopt_step(self, step: int, invs: dict[int, pb.Inventory]) -> int:
        """Decode the target's data of `step` from the pieces of `invs` (this node's own inventory among
        them) and seal its ranks here; the bytes of rank data installed. FtdError when it cannot."""
        invs = {n: inv for n, inv in invs.items() if n != self.me and not inv.rebuilding}
        return self._rebuild(step, invs).data_bytes

    def _wait_for_peers(self) -> dict[int, pb.Inventory]:
        """Inventories of the group peers that answer within the wait (all of them, usually sooner)."""
        deadline = time.monotonic() + self.p.wait_seconds
        while True:
            invs = self.p.table.inventories()
            if len(invs) >= self.group.size - 1 or time.monotonic() > deadline:
                return {n: inv for n, inv in invs.items() if not inv.rebuilding}
            time.sleep(knobs.get().peer_poll_interval)

    def _holders(self, step: int, record: RotationRecord, invs: dict[int, pb.Inventory]) -> dict[int, int]:
        """Codec index -> node that can serve that piece of `record`'s rotation."""
        holders = {}
        for i, (pos, _) in enumerate(record.data):
            node = record.members[pos]
            if node in invs and any(s.step == step for s in invs[node].steps):
                holders[i] = node
        for j, pos in enumerate(record.parity):
            node = record.members[pos]
            if node in invs and any((p.step, p.rotation, p.j) == (step, record.rotation, j) for p in invs[node].parity):
                holders[record.k + j] = node
        return holders

    def _record(self, step: int, rot: int, invs: dict[int, pb.Inventory]) -> RotationRecord:
        for node in invs:
            try:
                raw = read_sized(self.p.links(node), Record(step, rot), knobs.get().max_record_bytes,
                                 "rotation record", self.p.timeout())
                return RotationRecord.from_json(bytes(raw))
            except FtdError as exc:
                log.warning("record of step %d rotation %d not available from node %d: %s", step, rot, node, exc)
        raise Unrecoverable(f"no surviving node of group {self.group.index} holds the record of step {step} "
                            f"rotation {rot}")

    def _rebuild(self, step: int, invs: dict[int, pb.Inventory]) -> Rebuilt:
        g, position = self.group, self.group.position(self.me)
        t0 = time.perf_counter()
        records = []
        for rot in rotations(g.size, g.m):
            try:
                records.append(self._record(step, rot.r, invs))
            except Unrecoverable:
                if position not in rot.parity:
                    raise
                # This node holds only parity in that rotation: its data comes back without it, and
                # the next step the group encodes is whole again.
                log.warning("rebuilding step %d without parity of rotation %d (its record is gone)", step, rot.r)
        plans = []
        for record in records:
            holders = self._holders(step, record, invs)
            if self._data_only and not any(pos == position for pos, _ in record.data):
                continue  # the target holds only parity in this rotation: nothing of its data to decode
            mine = next(i for i, (pos, _) in enumerate(record.data) if pos == position) if any(
                pos == position for pos, _ in record.data) else record.k + record.parity.index(position)
            holders.pop(mine, None)
            if len(holders) < record.k:
                lost = sorted({n for n in g.members if not _holds(invs.get(n), step)} | {self.me})
                raise Unrecoverable(
                    f"group {g.index} {list(g.members)} lost nodes {lost} ({record.k}+{record.m} tolerates "
                    f"{record.m}): rotation {record.rotation} of step {step} has {len(holders)} of the {record.k} "
                    f"pieces it needs; memory cannot recover node {self.me}'s snapshots")
            plans.append((record, mine, holders))
        size = records[0].chunk_bytes
        # The rotation holding chunk 0 (the blob header) first: the header says where every rank's
        # segment lies, so the data is decoded straight into the reserved segments.
        plans.sort(key=lambda plan: 0 if plan[1] < plan[0].k and plan[0].data[plan[1]][1] == 0 else 1)
        log.info("rebuilding node %d step %d from %d peers: %d rotations of %d bytes", self.me, step, len(invs),
                 len(plans), size)
        with ThreadPoolExecutor(g.k + g.m, thread_name_prefix="ftd-rebuild") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="ftd-prefetch") as prefetch:
            job = _Decode(self, step, plans, size, pool, prefetch)
            pending = job.reserve_segments()
            try:
                job.run(pending)
                self.p.metrics.ec_decode_bytes.inc(job.done)
                data = self._install(step, pending, size * len(plans), t0)
            finally:
                for part in pending.values():
                    part.release()
        return Rebuilt(step, tuple(records), data)

    def _install(self, step: int, pending: dict[BlobPart, PendingInstall], total: int, t0: float) -> int:
        """Verify every decoded segment against its manifest and seal it; the bytes of rank data."""
        for part, segment in pending.items():
            try:
                segment.seal(part.manifest_json, self.source)
            except (ManifestError, SnapshotCorrupt) as exc:
                raise FtdError(f"rebuilt rank {part.rank} of step {step} does not match its manifest: {exc}") from exc
        seconds = time.perf_counter() - t0
        if self.source is Source.REBUILT:
            self.p.metrics.rebuild_seconds.observe(seconds)
        data = sum(part.nbytes for part in pending)
        log.info("rebuilt node %d step %d from peers in %.2f s (%d bytes, %.2f GB/s decoded; %d bytes of rank data, "
                 "%.2f GB/s); %d rank(s) restored", self.me, step, seconds, total, total / max(seconds, 1e-9) / 1e9,
                 data, data / max(seconds, 1e-9) / 1e9, len(pending))
        return data

    def _fetch(self, pool: ThreadPoolExecutor, step: int, record: RotationRecord, holders: dict[int, int],
               start: int, n: int) -> dict[int, bytearray]:
        """k verified pieces [start, start + n) of the rotation, pulled from k peers in parallel.

        A piece that is unavailable or fails its checksum is not used; another survivor's is fetched.
        """
        present: dict[int, bytearray] = {}
        candidates = sorted(holders.items())
        while len(present) < record.k and candidates:
            want = record.k - len(present)
            batch, candidates = candidates[:want], candidates[want:]
            for index, buf in pool.map(lambda item: self._fetch_one(step, record, *item, start, n), batch):
                if buf is not None:
                    present[index] = buf
        if len(present) < record.k:
            raise Unrecoverable(f"only {len(present)} intact pieces of step {step} rotation {record.rotation} "
                                f"(need {record.k}); memory cannot recover node {self.me}'s snapshots")
        return present

    def _fetch_one(self, step: int, record: RotationRecord, index: int, node: int, start: int,
                   n: int) -> tuple[int, bytearray | None]:
        if index < record.k:
            key = DataChunk(step, record.data[index][1], record.chunk_bytes).key()
        else:
            key = ParityChunk(step, record.rotation, index - record.k).key()
        buf = bytearray(n)
        try:
            self.p.links(node).get_range(key, start, n, memoryview(buf), self.p.timeout())
        except FtdError as exc:
            log.warning("piece %d of step %d rotation %d from node %d unavailable: %s", index, step,
                        record.rotation, node, exc)
            return index, None
        first = start // record.stripe_bytes
        got = stripe_checksums(buf, record.stripe_bytes)
        if got != record.checksums[index][first:first + len(got)]:
            kind = "data" if index < record.k else "parity"
            log.error("piece %d (%s) of step %d rotation %d from node %d fails its checksum; not used",
                      index, kind, step, record.rotation, node)
            self.p.metrics.checksum_failures.labels(kind).inc()
            return index, None
        return index, buf


class _Decode:
    """One step's decoding: every batch of every rotation, the next batch pulled while one decodes.

    Data chunks are decoded straight into the ranks' reserved segments (the blob's header and
    padding are decoded into a scratch batch and dropped); parity chunks into their parity files.
    """

    def __init__(self, rebuilder: Rebuilder, step: int, plans: list[tuple[RotationRecord, int, dict[int, int]]],
                 size: int, pool: ThreadPoolExecutor, prefetch: ThreadPoolExecutor):
        self.r, self.step, self.plans, self.size, self.pool, self.prefetch = rebuilder, step, plans, size, pool, prefetch
        stripe = plans[0][0].stripe_bytes if plans else 1  # pieces are checked stripe by stripe
        self.batch = max(1, knobs.get().rebuild_batch_bytes // stripe) * stripe
        self.done = 0

    def _decode_into(self, plan: tuple[RotationRecord, int, dict[int, int]], start: int, n: int,
                     out: memoryview | bytearray, present: dict[int, bytearray] | None = None) -> None:
        record, mine, holders = plan
        if present is None:
            present = self.r._fetch(self.pool, self.step, record, holders, start, n)
        decode_striped(self.r.p.codec, present, [mine], record.stripe_bytes, out={mine: out})

    def reserve_segments(self) -> dict[BlobPart, PendingInstall]:
        """Decode the blob header (the start of chunk 0), check it and reserve a segment per rank."""
        first = self.plans[0]
        record, mine, _ = first
        if not (mine < record.k and record.data[mine][1] == 0):
            raise FtdError(f"no rotation of step {self.step} holds chunk 0 of node {self.r.me}'s blob")
        n = min(self.batch, self.size)
        head = bytearray(n)
        self._decode_into(first, 0, n, head)
        if len(head) >= 8:
            (length,) = struct.unpack_from("<Q", head, 0)
            want = -(-(8 + length) // record.stripe_bytes) * record.stripe_bytes
            if n < want <= min(self.size, 8 + MAX_HEADER_BYTES + record.stripe_bytes):
                head = bytearray(want)  # a header longer than one batch (many ranks)
                for s in range(0, want, self.batch):
                    self._decode_into(first, s, min(self.batch, want - s), memoryview(head)[s:s + self.batch])
        try:
            _, node, parts = parse_header(head, self.size * self.r.group.k)
        except ManifestError as exc:
            raise FtdError(f"rebuilt blob header of step {self.step} is unusable: {exc}") from exc
        if node != self.r.me:
            raise FtdError(f"rebuilt blob belongs to node {node}, not {self.r.me}")
        pending: dict[BlobPart, PendingInstall] = {}
        try:
            for part in parts:
                pending[part] = self.r.p.store.reserve_install(part.rank, self.step, part.nbytes)
        except BaseException:
            for segment in pending.values():
                segment.release()
            raise
        return pending

    def _jobs(self) -> list[tuple[int, int, int]]:
        return [(i, start, min(self.batch, self.size - start)) for i in range(len(self.plans))
                for start in range(0, self.size, self.batch)]

    def run(self, pending: dict[BlobPart, PendingInstall]) -> None:
        views = {part: segment.view() for part, segment in pending.items()}
        scratch = bytearray(self.batch)
        jobs = self._jobs()
        total = self.size * len(self.plans)
        next_report = 0.1

        def fetch(job: tuple[int, int, int]) -> dict[int, bytearray]:
            record, _, holders = self.plans[job[0]]
            return self.r._fetch(self.pool, self.step, record, holders, job[1], job[2])

        try:
            future = self.prefetch.submit(fetch, jobs[0])
            for j, (i, start, n) in enumerate(jobs):
                present = future.result()
                if j + 1 < len(jobs):  # pull the next batch while this one decodes
                    future = self.prefetch.submit(fetch, jobs[j + 1])
                plan = self.plans[i]
                record, mine, _ = plan
                if mine >= record.k:
                    target = self.r.p.parity.create(self.step, record.rotation, mine - record.k, self.size)
                    with memoryview(target) as view:
                        self._decode_into(plan, start, n, view[start:start + n], present)
                else:
                    self._scatter(plan, start, n, present, views, scratch)
                self.done += n
                self.r.p.metrics.rebuild_progress.set(self.done / total)
                if self.done / total >= next_report:
                    log.info("rebuild of node %d: %3.0f%% (%d of %d bytes)", self.r.me, 100 * self.done / total,
                             self.done, total)
                    next_report += 0.1
        finally:
            for view in views.values():
                view.release()

    def _scatter(self, plan: tuple[RotationRecord, int, dict[int, int]], start: int, n: int,
                 present: dict[int, bytearray], views: dict[BlobPart, memoryview], scratch: bytearray) -> None:
        """Decode blob bytes [base, base + n) into the segments they belong to."""
        record, mine, _ = plan
        base = record.data[mine][1] * self.size + start
        inside = [p for p in views if p.offset <= base and base + n <= p.offset + p.nbytes]
        if inside:  # the whole batch lies in one rank's segment: decode in place
            part = inside[0]
            self._decode_into(plan, start, n, views[part][base - part.offset:base - part.offset + n], present)
            return
        out = memoryview(scratch)[:n]
        self._decode_into(plan, start, n, out, present)
        for part, view in views.items():
            lo, hi = max(base, part.offset), min(base + n, part.offset + part.nbytes)
            if lo < hi:
                view[lo - part.offset:hi - part.offset] = out[lo - base:hi - base]
