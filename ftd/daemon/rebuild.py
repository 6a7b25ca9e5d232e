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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ftd import knobs
from ftd._proto import peer_pb2 as pb
from ftd.codec import Codec, decode_striped
from ftd.daemon.blob import parse_header
from ftd.daemon.bulkmsg import DataChunk, ParityChunk, Record, read_sized
from ftd.daemon.groups import Group, rotations
from ftd.daemon.links import PeerLink
from ftd.daemon.parity import ParityStore, RotationRecord, stripe_checksums
from ftd.daemon.peers import PeerTable
from ftd.daemon.slots import Source
from ftd.daemon.store import SegmentStore
from ftd.errors import FtdError
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
        blob = bytearray(size * g.k)
        log.info("rebuilding node %d step %d from %d peers: %d rotations of %d bytes", self.me, step, len(invs),
                 len(plans), size)
        with ThreadPoolExecutor(g.k + g.m, thread_name_prefix="ftd-rebuild") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="ftd-prefetch") as prefetch:
            done = self._decode_all(step, plans, size, blob, pool, prefetch)
        self.p.metrics.ec_decode_bytes.inc(done)
        data = self._install(step, blob, size * len(plans), t0)
        return Rebuilt(step, tuple(records), data)

    def _decode_all(self, step: int, plans: list[tuple[RotationRecord, int, dict[int, int]]], size: int,
                    blob: bytearray, pool: ThreadPoolExecutor, prefetch: ThreadPoolExecutor) -> int:
        """Decode this node's chunk of every rotation into `blob` (data) or its parity files; return bytes."""
        total = size * len(plans)
        done, next_report = 0, 0.1
        for record, mine, holders in plans:
            if mine < record.k:
                chunk_no = record.data[mine][1]
                target = memoryview(blob)[chunk_no * size:(chunk_no + 1) * size]
            else:
                target = memoryview(self.p.parity.create(step, record.rotation, mine - record.k, size))
            batch = knobs.get().rebuild_batch_bytes
            starts = list(range(0, size, batch))
            pending = prefetch.submit(self._fetch, pool, step, record, holders, 0, min(batch, size))
            for i, start in enumerate(starts):
                n = min(batch, size - start)
                present = pending.result()
                if i + 1 < len(starts):  # pull the next batch while this one decodes
                    nxt = starts[i + 1]
                    pending = prefetch.submit(self._fetch, pool, step, record, holders, nxt,
                                              min(batch, size - nxt))
                decode_striped(self.p.codec, present, [mine], record.stripe_bytes, out={mine: target[start:start + n]})
                done += n
                self.p.metrics.rebuild_progress.set(done / total)
                if done / total >= next_report:
                    log.info("rebuild of node %d: %3.0f%% (%d of %d bytes)", self.me, 100 * done / total, done, total)
                    next_report += 0.1
        return done

    def _install(self, step: int, blob: bytearray, total: int, t0: float) -> int:
        """Seal the rebuilt ranks' segments (the caller adopts the records); the bytes of rank data."""
        _, node, parts = parse_header(blob, len(blob))
        if node != self.me:
            raise FtdError(f"rebuilt blob belongs to node {node}, not {self.me}")
        for part in parts:
            self.p.store.install_sealed(part.rank, step, part.manifest_json,
                                        memoryview(blob)[part.offset:part.offset + part.nbytes], source=self.source)
        seconds = time.perf_counter() - t0
        if self.source is Source.REBUILT:
            self.p.metrics.rebuild_seconds.observe(seconds)
        data = sum(part.nbytes for part in parts)
        log.info("rebuilt node %d step %d from peers in %.2f s (%d bytes, %.2f GB/s decoded; %d bytes of rank data, "
                 "%.2f GB/s); %d rank(s) restored", self.me, step, seconds, total, total / max(seconds, 1e-9) / 1e9,
                 data, data / max(seconds, 1e-9) / 1e9, len(parts))
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
