"""The daemon's shared-memory store: segments per rank, sealing, retention, budget, re-adoption.

Files live under `<shm_dir>/ftd-<job>/rank-<r>/`: `<id>.seg` is a segment (allocated once,
pre-faulted, reused) and `<id>.manifest.json` exists exactly while it is sealed. The manifest is
written atomically (temp + rename) at seal and removed before a segment is reused, so a daemon
restarted after SIGKILL re-adopts what it finds sealed and drops everything else.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ftd.config import DaemonConfig
from ftd.daemon.slots import Slot, SlotState
from ftd.errors import ManifestError, NotFound, OutOfMemory, RequestRejected
from ftd.manifest import Manifest
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

SEGMENT_ROUNDING = 1 << 20
_ZEROS = bytes(8 << 20)
MAX_RANK = 1 << 20


@dataclass(frozen=True)
class Lease:
    """What Begin hands a rank: where to write and the token that Commit must show."""

    lease: int
    path: str
    capacity: int


@dataclass(frozen=True)
class RankSummary:
    rank: int
    sealed_steps: list[int]
    held_bytes: int
    writing: bool


class SegmentStore:
    """All segments of one job on this node. Thread-safe; every public method takes the lock."""

    def __init__(self, config: DaemonConfig, metrics: DaemonMetrics | None = None):
        self.config = config
        self.metrics = metrics or DaemonMetrics()
        self.root = Path(config.shm_dir) / f"ftd-{config.job}"
        self._slots: dict[int, list[Slot]] = {}
        self._pinned: set[int] = set()
        self._age_tracked: set[int] = set()
        self._lock = threading.Lock()
        self.metrics.shm_budget_bytes.set(config.memory_budget)

    # ---- start-up ---------------------------------------------------------------------------

    def adopt(self, retain: bool = True) -> tuple[int, int]:
        """Re-adopt sealed segments left by an earlier daemon; drop half-written ones. Returns (adopted, dropped).

        `retain=False` leaves retention to the first `pin()`: with erasure coding the protected step
        is older than the newest `keep` and must be pinned before anything is evicted.
        """
        adopted = dropped = 0
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for rank_dir in sorted(self.root.glob("rank-*")):
                rank = _parse_rank(rank_dir.name)
                if rank is None:
                    continue
                for tmp in rank_dir.glob("*.tmp"):
                    tmp.unlink(missing_ok=True)
                for seg in sorted(rank_dir.glob("*.seg")):
                    slot = Slot(seg, seg.stat().st_size)
                    step, manifest_json, why = self._read_sealed(slot, rank)
                    if step is None:
                        log.warning("dropping segment %s: %s", seg, why)
                        seg.unlink(missing_ok=True)
                        slot.manifest_path.unlink(missing_ok=True)
                        dropped += 1
                        continue
                    slot.adopt_sealed(step, manifest_json, slot.manifest_path.stat().st_mtime_ns)
                    slot.data_bytes = Manifest.from_json(manifest_json).data_bytes
                    slot.foreign = slot.rebuilt = _foreign_marker(slot).exists()
                    self._track_age(rank)
                    self._slots.setdefault(rank, []).append(slot)
                    adopted += 1
                    log.info("re-adopted rank %d step %d (%s, %d bytes)", rank, step, seg.name, slot.capacity)
                for orphan in rank_dir.glob("*.manifest.json"):
                    if not orphan.with_name(orphan.name.removesuffix(".manifest.json") + ".seg").exists():
                        orphan.unlink(missing_ok=True)
                if retain:
                    self._retain(rank)
                self._update_gauges(rank)
        self.metrics.segments_adopted.inc(adopted)
        self.metrics.segments_dropped.inc(dropped)
        return adopted, dropped

    def _read_sealed(self, slot: Slot, rank: int) -> tuple[int | None, bytes, str]:
        try:
            raw = slot.manifest_path.read_bytes()
        except FileNotFoundError:
            return None, b"", "no manifest (the copy never committed)"
        try:
            manifest = Manifest.from_json(raw)
            manifest.validate(slot.capacity)
        except ManifestError as exc:
            return None, b"", f"invalid manifest: {exc}"
        if manifest.job != self.config.job or manifest.rank != rank:
            return None, b"", f"manifest is for job {manifest.job!r} rank {manifest.rank}"
        return manifest.step, raw, ""

    # ---- the snapshot protocol --------------------------------------------------------------

    def begin(self, job: str, rank: int, step: int, nbytes: int) -> Lease:
        """Reserve a segment of at least `nbytes` for (rank, step); supersedes an unfinished one."""
        self._check(job, rank, step)
        if nbytes <= 0:
            raise RequestRejected(f"nbytes must be positive, got {nbytes}")
        with self._lock:
            slots = self._slots.setdefault(rank, [])
            for slot in slots:
                if slot.state is SlotState.WRITING:
                    log.warning("rank %d: step %s was never committed; its segment is reused", rank, slot.step)
                    self.metrics.snapshots_aborted.labels("superseded").inc()
                    slot.release()
            slot = self._free_slot(rank, nbytes)
            lease = secrets.randbits(63) or 1
            slot.begin(step, lease, time.monotonic())
            fresh = slot.unfilled
        if fresh:  # outside the lock: other ranks keep committing while this one's pages are faulted in
            self._fill(rank, slot)
            if self.config.preallocate:
                self._preallocate_later(rank, slot.capacity)
        log.debug("rank %d step %d: writing into %s", rank, step, slot.path.name)
        return Lease(lease, str(slot.path), slot.capacity)

    def commit(self, job: str, rank: int, step: int, lease: int, manifest_json: bytes) -> list[int]:
        """Seal the segment leased for (rank, step) after validating its manifest; return held steps."""
        self._check(job, rank, step)
        manifest = Manifest.from_json(manifest_json)
        with self._lock:
            slot = self._writing(rank, step, lease)
            if (manifest.job, manifest.rank, manifest.step) != (job, rank, step):
                raise ManifestError(f"manifest is for job {manifest.job!r} rank {manifest.rank} step "
                                    f"{manifest.step}, the commit for job {job!r} rank {rank} step {step}")
            manifest.validate(slot.capacity)
            tmp = slot.manifest_path.with_suffix(".tmp")
            tmp.write_bytes(manifest_json)
            os.replace(tmp, slot.manifest_path)
            for other in self._slots[rank]:
                if other is not slot and other.state is SlotState.SEALED and other.step == step:
                    self._evict(other, "replaced by a newer copy of the same step")
            slot.seal(manifest_json, time.time_ns())
            slot.data_bytes = manifest.data_bytes
            self._track_age(rank)
            self.metrics.commit_latency.observe(time.monotonic() - slot.begun_at)
            self.metrics.snapshots_sealed.labels(str(rank)).inc()
            self.metrics.snapshot_bytes.labels(str(rank)).inc(manifest.data_bytes)
            self._retain(rank)
            self._update_gauges(rank)
            held = self._sealed_steps(rank)
        log.info("sealed rank %d step %d (%d bytes); holding steps %s", rank, step, manifest.data_bytes, held)
        return held

    def abort(self, job: str, rank: int, step: int, lease: int, reason: str) -> None:
        self._check(job, rank, step)
        with self._lock:
            slot = self._writing(rank, step, lease)
            slot.release()
        self.metrics.snapshots_aborted.labels("client").inc()
        log.warning("rank %d aborted step %d: %s", rank, step, reason[:200])

    def list_steps(self, job: str, rank: int) -> list[int]:
        self._check(job, rank, 0)
        with self._lock:
            return self._sealed_steps(rank)

    def open(self, job: str, rank: int, step: int) -> tuple[str, int, bytes, str]:
        """(path, capacity, manifest JSON, "local" | "peers") of a sealed step.

        The manifest is read back from shared memory, not from the copy taken at seal: what is
        restored is what is there now, and the reader verifies it.
        """
        self._check(job, rank, step)
        with self._lock:
            for slot in self._slots.get(rank, []):
                if slot.state is SlotState.SEALED and slot.step == step:
                    try:
                        manifest_json = slot.manifest_path.read_bytes()
                    except OSError as exc:
                        raise NotFound(f"rank {rank} step {step}: manifest {slot.manifest_path} is gone: {exc}") from exc
                    self.metrics.restores_served.inc()
                    return str(slot.path), slot.capacity, manifest_json, "peers" if slot.rebuilt else "local"
        raise NotFound(f"job {job!r} rank {rank} step {step} is not held here (held: {self.list_steps(job, rank)})")

    def discard(self, job: str, rank: int, above_step: int) -> list[int]:
        """Drop sealed steps above `above_step` (a timeline abandoned by a restore)."""
        self._check(job, rank, 0)
        with self._lock:
            dropped = [s.step for s in self._slots.get(rank, []) if s.state is SlotState.SEALED
                       and s.step is not None and s.step > above_step]
            for slot in list(self._slots.get(rank, [])):
                if slot.state is SlotState.SEALED and slot.step in dropped:
                    self._evict(slot, f"discarded above step {above_step}")
            self._update_gauges(rank)
        return sorted(int(s) for s in dropped if s is not None)

    def summary(self) -> list[RankSummary]:
        with self._lock:
            return [RankSummary(rank, self._sealed_steps(rank), sum(s.capacity for s in slots),
                                any(s.state is SlotState.WRITING for s in slots))
                    for rank, slots in sorted(self._slots.items())]

    def held_bytes(self) -> int:
        with self._lock:
            return self._held()

    # ---- what erasure coding needs -----------------------------------------------------------

    def pin(self, steps: set[int]) -> None:
        """Keep these steps sealed whatever `keep` says (the newest protected step, the one being encoded)."""
        with self._lock:
            self._pinned = set(steps)
            for rank in self._slots:
                self._retain(rank)

    def complete_steps(self) -> dict[int, list[tuple[int, str, int, bytes]]]:
        """Steps every *current* local rank has sealed -> (rank, segment path, data bytes, manifest JSON).

        A rank that stopped sealing has moved away (torchrun reassigns ranks when a node is replaced)
        and no longer holds back the node's complete steps: it sealed nothing since the oldest seal the
        rank that sealed last still holds, and its newest step is more than keep + 2 behind that rank's
        or ahead of it (a fresh start numbers the current ranks' steps below the stale ones).
        """
        with self._lock:
            per_rank = {rank: {s.step: s for s in slots if s.state is SlotState.SEALED and s.step is not None}
                        for rank, slots in self._slots.items()}
        per_rank = {rank: steps for rank, steps in per_rank.items() if steps}
        if not per_rank:
            return {}
        latest = {rank: max(steps.values(), key=lambda s: s.sealed_at_ns) for rank, steps in per_rank.items()}
        leader = max(latest, key=lambda rank: latest[rank].sealed_at_ns)
        lead_step = int(latest[leader].step)  # type: ignore[arg-type]
        cutoff = min(s.sealed_at_ns for s in per_rank[leader].values())

        def moved_away(rank: int) -> bool:
            newest = latest[rank]
            step = int(newest.step)  # type: ignore[arg-type]
            return newest.sealed_at_ns < cutoff and (step < lead_step - self.config.keep - 2 or step > lead_step)

        per_rank = {rank: steps for rank, steps in per_rank.items() if not moved_away(rank)}
        common = set.intersection(*(set(steps) for steps in per_rank.values()))
        out: dict[int, list[tuple[int, str, int, bytes]]] = {}
        for step in common:
            parts = []
            for rank, steps in per_rank.items():
                slot = steps[step]
                parts.append((rank, str(slot.path), slot.data_bytes, slot.manifest_json or b""))
            out[int(step)] = parts  # type: ignore[index]
        return out

    def blob_parts(self, step: int) -> list[tuple[int, str, int, bytes]]:
        """This node's own data of `step`: every sealed segment of it that was not fetched from a peer,
        by rank. Unlike `complete_steps` it does not change when ranks move."""
        with self._lock:
            found = [(rank, str(s.path), s.data_bytes, s.manifest_json or b"") for rank, slots in self._slots.items()
                     for s in slots if s.state is SlotState.SEALED and s.step == step and not s.foreign]
        return sorted(found)

    def newest_sealed_step(self) -> int | None:
        """The step most recently sealed on this node (by seal time, not number); None when none is."""
        with self._lock:
            sealed = [(s.sealed_at_ns, s.step) for slots in self._slots.values() for s in slots
                      if s.state is SlotState.SEALED and s.step is not None]
        return int(max(sealed)[1]) if sealed else None  # type: ignore[arg-type]

    def is_empty(self) -> bool:
        with self._lock:
            return not any(self._slots.values())

    def install_sealed(self, rank: int, step: int, manifest_json: bytes, data: memoryview,
                       foreign: bool = False) -> None:
        """Seal a snapshot rebuilt from peers as if rank `rank` had committed it.

        `foreign`: fetched for a rank that moved here; it stays out of this node's blob (the node
        that sealed it protects it), also after a daemon restart (a marker file says so).
        """
        manifest = Manifest.from_json(manifest_json)
        manifest.validate(len(data))
        manifest.verify(data)
        with self._lock:
            self._slots.setdefault(rank, [])
            slot = self._free_slot(rank, max(1, len(data)))
            slot.unfilled = False  # the write below touches what is needed
            with open(slot.path, "r+b") as f:
                f.write(data)
            slot.begin(step, 0, time.monotonic())
            tmp = slot.manifest_path.with_suffix(".tmp")
            tmp.write_bytes(manifest_json)
            os.replace(tmp, slot.manifest_path)
            slot.seal(manifest_json, time.time_ns())
            slot.data_bytes = manifest.data_bytes
            slot.rebuilt = True
            slot.foreign = foreign
            if foreign:
                _foreign_marker(slot).touch()
            else:
                _foreign_marker(slot).unlink(missing_ok=True)
            self._track_age(rank)
            self._retain(rank)
            self._update_gauges(rank)
        log.info("installed rebuilt rank %d step %d (%d bytes)", rank, step, len(data))

    # ---- internals (lock held) --------------------------------------------------------------

    def _check(self, job: str, rank: int, step: int) -> None:
        if job != self.config.job:
            raise RequestRejected(f"this daemon serves job {self.config.job!r}, not {job!r}")
        if not 0 <= rank < MAX_RANK:
            raise RequestRejected(f"rank {rank} is out of range")
        if step < 0:
            raise RequestRejected(f"step {step} is negative")

    def _writing(self, rank: int, step: int, lease: int) -> Slot:
        for slot in self._slots.get(rank, []):
            if slot.state is SlotState.WRITING and slot.step == step and slot.lease == lease:
                return slot
        raise RequestRejected(f"rank {rank} holds no lease {lease} for step {step} (superseded, or the daemon restarted)")

    def _sealed_steps(self, rank: int) -> list[int]:
        return sorted(s.step for s in self._slots.get(rank, []) if s.state is SlotState.SEALED and s.step is not None)

    def _held(self) -> int:
        return sum(s.capacity for slots in self._slots.values() for s in slots)

    def _free_slot(self, rank: int, nbytes: int) -> Slot:
        slots = self._slots[rank]
        for slot in [s for s in slots if s.state is SlotState.FREE and not s.filling and not _intact(s)]:
            log.warning("rank %d: segment %s was truncated or removed behind the daemon's back; replacing it",
                        rank, slot.path.name)
            self._delete(rank, slot)
        free = sorted((s for s in slots if s.state is SlotState.FREE and not s.filling), key=lambda s: s.capacity)
        fitting = [s for s in free if s.capacity >= nbytes]
        if fitting:
            return fitting[0]
        for slot in free:  # too small for this state: give the memory back first
            self._delete(rank, slot)
        sealed = sorted((s for s in slots if s.state is SlotState.SEALED and s.step not in self._pinned),
                        key=lambda s: s.sealed_at_ns)
        capacity = -(-nbytes // SEGMENT_ROUNDING) * SEGMENT_ROUNDING
        if len(slots) < self.config.keep + 1 + len(self._pinned):
            try:
                return self._allocate(rank, capacity)
            except OutOfMemory:
                if len(sealed) < 2:
                    raise
                log.warning("rank %d: memory is short, evicting step %s early", rank, sealed[0].step)
        elif not sealed:
            raise OutOfMemory(f"rank {rank} already has {len(slots)} segments in use")
        victim = sealed[0]
        self._evict(victim, "making room")
        if victim.capacity >= nbytes:
            return victim
        self._delete(rank, victim)
        return self._allocate(rank, capacity)

    def _allocate(self, rank: int, capacity: int) -> Slot:
        budget = self.config.memory_budget
        held = self._held()
        if budget and held + capacity > budget:
            self.metrics.refused.labels("budget").inc()
            raise OutOfMemory(f"a {capacity}-byte segment for rank {rank} would exceed the memory budget "
                              f"({held} of {budget} bytes held)")
        available = psutil.virtual_memory().available
        if available - capacity < self.config.memory_reserve:
            self.metrics.refused.labels("host_memory").inc()
            raise OutOfMemory(f"a {capacity}-byte segment for rank {rank} would leave {available - capacity} bytes "
                              f"of host memory available, under the reserve of {self.config.memory_reserve}")
        directory = self.root / f"rank-{rank}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{secrets.token_hex(8)}.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, capacity)
        finally:
            os.close(fd)
        slot = Slot(path, capacity, unfilled=True)
        self._slots[rank].append(slot)
        self.metrics.shm_held_bytes.set(self._held())
        return slot

    def _fill(self, rank: int, slot: Slot) -> None:
        """Allocate and touch every page of a new segment (lock not held), so no copy ever page-faults.

        tmpfs pages are only zeroed on first touch; writing zeros here keeps that cost out of the
        trainer's copy. A full tmpfs gives OutOfMemory and the segment is removed.
        """
        t0 = time.perf_counter()
        try:
            fd = os.open(slot.path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, slot.capacity)
                for offset in range(0, slot.capacity, len(_ZEROS)):
                    os.pwrite(fd, _ZEROS[:min(len(_ZEROS), slot.capacity - offset)], offset)
            finally:
                os.close(fd)
        except OSError as exc:
            with self._lock:
                if slot in self._slots.get(rank, []):
                    if slot.state is SlotState.WRITING:
                        slot.release()
                    self._delete(rank, slot)
            self.metrics.refused.labels("shm_full").inc()
            raise OutOfMemory(f"cannot allocate {slot.capacity} bytes in {slot.path.parent}: {exc}") from exc
        slot.unfilled = False
        seconds = time.perf_counter() - t0
        log.info("rank %d: allocated segment %s (%d bytes, pre-faulted in %.2f s)", rank, slot.path.name,
                 slot.capacity, seconds)

    def _preallocate_later(self, rank: int, capacity: int) -> None:
        """Prepare the rest of the rank's keep + 1 segments in the background (thread ftd-prealloc-<rank>)."""
        def run() -> None:
            while True:
                with self._lock:
                    slots = self._slots.get(rank, [])
                    if len(slots) >= self.config.keep + 1:
                        return
                    try:
                        slot = self._allocate(rank, capacity)
                    except OutOfMemory as exc:
                        log.debug("rank %d: no segment prepared ahead: %s", rank, exc)
                        return
                    slot.filling = True
                try:
                    self._fill(rank, slot)
                except OutOfMemory as exc:
                    log.warning("rank %d: preparing a segment ahead failed: %s", rank, exc)
                    return
                finally:
                    slot.filling = False

        threading.Thread(target=run, name=f"ftd-prealloc-{rank}", daemon=True).start()

    def _evict(self, slot: Slot, why: str) -> None:
        slot.manifest_path.unlink(missing_ok=True)
        _foreign_marker(slot).unlink(missing_ok=True)
        log.debug("evicting step %s (%s): %s", slot.step, slot.path.name, why)
        slot.release()

    def _delete(self, rank: int, slot: Slot) -> None:
        slot.path.unlink(missing_ok=True)
        slot.manifest_path.unlink(missing_ok=True)
        _foreign_marker(slot).unlink(missing_ok=True)
        self._slots[rank].remove(slot)
        self.metrics.shm_held_bytes.set(self._held())

    def _retain(self, rank: int) -> None:
        # By seal time, not step: after a restart from scratch, stale higher steps of an abandoned
        # timeline must go before the new ones.
        sealed = sorted((s for s in self._slots.get(rank, []) if s.state is SlotState.SEALED
                         and s.step not in self._pinned), key=lambda s: (s.sealed_at_ns, s.step or 0))
        for slot in sealed[:max(0, len(sealed) - self.config.keep)]:
            self._evict(slot, f"keeping the newest {self.config.keep}")

    def _track_age(self, rank: int) -> None:
        """Export ftd_snapshot_age_seconds{rank}: now minus the newest seal of that rank."""
        if rank not in self._age_tracked:
            self._age_tracked.add(rank)

            def age() -> float:
                with self._lock:
                    newest = max((s.sealed_at_ns for s in self._slots.get(rank, [])
                                  if s.state is SlotState.SEALED), default=0)
                return (time.time_ns() - newest) / 1e9 if newest else float("nan")

            self.metrics.snapshot_age.labels(str(rank)).set_function(age)

    def _update_gauges(self, rank: int) -> None:
        steps = self._sealed_steps(rank)
        if steps:
            self.metrics.newest_sealed_step.labels(str(rank)).set(steps[-1])
        self.metrics.shm_held_bytes.set(self._held())


def _intact(slot: Slot) -> bool:
    """The segment file still exists with its full size (a truncated mapping would SIGBUS the writer)."""
    try:
        return slot.path.stat().st_size == slot.capacity
    except OSError:
        return False


def _parse_rank(name: str) -> int | None:
    try:
        rank = int(name.removeprefix("rank-"))
    except ValueError:
        return None
    return rank if 0 <= rank < MAX_RANK else None


def _foreign_marker(slot: Slot) -> Path:
    return slot.path.with_suffix(".foreign")
