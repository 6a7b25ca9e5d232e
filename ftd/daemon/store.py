"""The daemon's shared-memory store: segments per rank, sealing, retention, budget, re-adoption.

Files live under `<shm_dir>/ftd-<job>/rank-<r>/`: `<id>.seg` is a segment (allocated once,
pre-faulted, reused) and `<id>.manifest.json` exists exactly while it is sealed. The manifest is
written atomically (temp + rename) at seal and removed before a segment is reused, so a daemon
restarted after SIGKILL re-adopts what it finds sealed and drops everything else. `<id>.source`
holds the `Source` of a segment installed from peers ("rebuilt" or "fetched", written before its
manifest); absent, the segment is LOCAL. A segment is adopted with the source found there.

Trust: the daemon creates `ftd-<job>` itself (0700, or 0750 with group `shm_group`) and refuses one
that is a symlink, owned by another uid, or writable by group/others. Rank directories are checked
the same way; every file is opened with O_NOFOLLOW and must be a regular file of the daemon's uid;
manifests and source files are 0600. Stray entries are skipped (log + ftd_shm_entries_skipped), never fatal.

Retention keeps the newest `keep` steps of the current timeline (steps up to the one sealed last)
and, separately, up to `keep` higher steps of an older timeline (a trainer that started over from
step 0): those go only through `discard`/`discard_all`, never by retention or memory pressure.
A rank writes into `segments_per_rank` segments in turn (max(keep, 2); keep + 1 with spare_segment):
once that many of its steps below the one it begins are sealed, the oldest one's segment takes it.
`prepare` makes them ahead of the rank's first Begin, at the size its Hello announced.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ftd.config import DaemonConfig
from ftd.daemon.slots import Slot, SlotState, Source
from ftd.errors import FtdError, ManifestError, NotFound, OutOfMemory, RequestRejected
from ftd.manifest import EntryCache, Manifest
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

SEGMENT_ROUNDING = 1 << 20
_ZEROS = bytes(8 << 20)
MAX_RANK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_SOURCE_BYTES = 64  # a `<id>.source` file holds one Source value
STALE_TIMELINE = "stale-timeline"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Lease:
    """What Begin hands a rank: where to write and the token that Commit must show."""

    lease: int
    path: str
    capacity: int


@dataclass(frozen=True, order=True)
class Holding:
    """One sealed segment held here (what a reshard plans with)."""

    rank: int
    step: int
    world_size: int
    source: str
    data_bytes: int


@dataclass(frozen=True)
class RankSummary:
    rank: int
    sealed_steps: list[int]
    held_bytes: int
    writing: bool
    stale_steps: list[int] = field(default_factory=list)  # higher steps of an older timeline, kept


class SegmentStore:
    """All segments of one job on this node. Thread-safe; every public method takes the lock."""

    def __init__(self, config: DaemonConfig, metrics: DaemonMetrics | None = None):
        self.config = config
        self.metrics = metrics or DaemonMetrics()
        self.root = Path(config.shm_dir) / f"ftd-{config.job}"
        self._slots: dict[int, list[Slot]] = {}
        self._pins: dict[str, set[int]] = {}
        self._last_stamp = 0  # ns of the newest seal (under the lock)
        self._external: Callable[[], int] | None = None
        self._clients: dict[int, tuple[int, float]] = {}  # rank -> (pid, its start time) from Hello
        self._root_ready = False
        self._stale_logged: dict[int, list[int]] = {}
        self._age_tracked: set[int] = set()
        self._newest_begin: dict[int, int] = {}  # rank -> lease of its latest Begin (supersedes a prefaulting one)
        self._entry_caches: dict[int, EntryCache] = {}  # rank -> its last committed layout (ranks that began)
        self._next_leases: dict[int, int] = {}  # rank -> the lease a Commit gave it for its next snapshot (lease_next)
        self._reaped_at = 0.0  # monotonic time of the last _reap (lease_next reaps at most once a second)
        self._lock = threading.Lock()
        self.metrics.shm_budget_bytes.set(config.memory_budget)

    # ---- start-up ---------------------------------------------------------------------------

    @property
    def _pinned(self) -> set[int]:
        return set().union(*self._pins.values()) if self._pins else set()

    @property
    def _dir_mode(self) -> int:
        return 0o750 if self.config.shm_group >= 0 else 0o700

    @property
    def dir_mode(self) -> int:
        """Mode of the job's directories: 0700, or 0750 when FTD_SHM_GROUP lets a group map segments."""
        return self._dir_mode

    def count_external(self, held_bytes: Callable[[], int]) -> None:
        """Count `held_bytes()` (parity files beside the segments) against the memory budget at admission."""
        self._external = held_bytes

    def prepare_root(self) -> Path:
        """Create `<shm_dir>/ftd-<job>` privately, or check that an existing one is safe; return it.

        Refuses (FtdError) a symlink, a non-directory, another owner, or group/other write bits.
        Idempotent; `adopt()` calls it, and the daemon calls it before taking daemon.lock.
        """
        Path(self.config.shm_dir).mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.root, self._dir_mode)
            log.info("created %s (mode %o)", self.root, self._dir_mode)
        except FileExistsError:
            pass
        self._check_dir(self.root, create_mode=True)
        self._root_ready = True
        return self.root

    def _check_dir(self, path: Path, create_mode: bool = False) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise FtdError(f"{path} is a symlink; ftd refuses to follow it (remove it, or choose another FTD_SHM_DIR)")
        if not stat.S_ISDIR(st.st_mode):
            raise FtdError(f"{path} is not a directory; remove it or choose another FTD_SHM_DIR")
        if st.st_uid != os.geteuid():
            raise FtdError(f"{path} is owned by uid {st.st_uid}, not the daemon's uid {os.geteuid()}: someone else "
                           f"created it; remove it (or choose another FTD_SHM_DIR) and start again")
        if st.st_mode & 0o022:
            raise FtdError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}: writable by group or others; "
                           f"ftd needs {self._dir_mode:o} (chmod it, or remove it)")
        if create_mode and stat.S_IMODE(st.st_mode) & 0o777 & ~self._dir_mode:
            os.chmod(path, self._dir_mode)  # ours and not writable by others: tighten to the scheme
        if create_mode and self.config.shm_group >= 0 and st.st_gid != self.config.shm_group:
            try:
                os.chown(path, -1, self.config.shm_group)
            except OSError as exc:
                raise FtdError(f"cannot give {path} to group {self.config.shm_group} (FTD_SHM_GROUP): {exc}") from None

    def _rank_dir(self, rank: int) -> Path:
        """The rank's directory, created privately; refused when it is a symlink or not ours."""
        if not self._root_ready:
            self.prepare_root()
        directory = self.root / f"rank-{rank}"
        try:
            os.mkdir(directory, self._dir_mode)
            if self.config.shm_group >= 0:
                os.chown(directory, -1, self.config.shm_group)
        except FileExistsError:
            pass
        try:
            self._check_dir(directory)
        except FtdError as exc:
            self.metrics.shm_entries_skipped.labels("unsafe_rank_dir").inc()
            raise OutOfMemory(f"rank {rank}: cannot use its segment directory: {exc}") from exc
        return directory

    def _skip(self, path: Path | str, reason: str, why: str) -> None:
        log.warning("skipping %s in the shm directory: %s", path, why)
        self.metrics.shm_entries_skipped.labels(reason).inc()

    # ---- start-up ---------------------------------------------------------------------------

    def adopt(self, retain: bool = True) -> tuple[int, int]:
        """Re-adopt sealed segments left by an earlier daemon; drop half-written ones. Returns (adopted, dropped).

        `retain=False` leaves retention to the first `pin()`: with erasure coding the protected step
        is older than the newest `keep` and must be pinned before anything is evicted. Stray entries
        (symlinks, directories named like segments, unreadable or absurd manifests) are logged,
        counted in ftd_shm_entries_skipped and left alone: none stops the daemon from starting.
        """
        adopted = dropped = 0
        self.prepare_root()
        with self._lock:
            for name in sorted(os.listdir(self.root)):
                if not name.startswith("rank-"):
                    continue
                rank = _parse_rank(name)
                rank_dir = self.root / name
                if rank is None:
                    continue
                try:
                    self._check_dir(rank_dir)
                    entries = sorted(os.listdir(rank_dir))
                except (FtdError, OSError) as exc:
                    self._skip(rank_dir, "unsafe_rank_dir", str(exc))
                    continue
                for entry in entries:
                    path = rank_dir / entry
                    try:
                        if entry.endswith(".tmp"):
                            if stat.S_ISDIR(os.lstat(path).st_mode):
                                self._skip(path, "not_regular", "a directory named like a temp file")
                            else:
                                path.unlink()  # unlink never follows a symlink
                            continue
                        if not entry.endswith(".seg"):
                            continue
                        outcome = self._adopt_one(rank, path)
                    except Exception as exc:  # noqa: BLE001 - one stray entry never stops the daemon
                        self._skip(path, "error", f"{type(exc).__name__}: {exc}")
                        continue
                    if outcome == "adopted":
                        adopted += 1
                    elif outcome == "dropped":
                        dropped += 1
                for entry in entries:
                    suffix = next((x for x in _COMPANIONS if entry.endswith(x)), None)
                    if suffix is None:
                        continue
                    orphan = rank_dir / entry
                    try:
                        st = os.lstat(orphan)
                        if not stat.S_ISDIR(st.st_mode) and not os.path.lexists(
                                rank_dir / (entry.removesuffix(suffix) + ".seg")):
                            orphan.unlink()
                    except OSError as exc:
                        self._skip(orphan, "error", str(exc))
                if retain:
                    self._retain(rank)
                self._update_gauges(rank)
        self.metrics.segments_adopted.inc(adopted)
        self.metrics.segments_dropped.inc(dropped)
        return adopted, dropped

    def _adopt_one(self, rank: int, seg: Path) -> str:
        """"adopted", "dropped" (half-written: removed) or "skipped" (not ours to touch: left alone)."""
        st = os.lstat(seg)
        if stat.S_ISLNK(st.st_mode):
            self._skip(seg, "symlink", "a symlink (never followed)")
            return "skipped"
        if not stat.S_ISREG(st.st_mode):
            self._skip(seg, "not_regular", "not a regular file")
            return "skipped"
        if st.st_uid != os.geteuid():
            self._skip(seg, "foreign_owner", f"owned by uid {st.st_uid}, not the daemon's")
            return "skipped"
        slot = Slot(seg, st.st_size)
        try:
            step, manifest_json, why, mtime = self._read_sealed(slot, rank)
        except Exception as exc:  # noqa: BLE001 - a manifest that cannot even be parsed is half-written
            step, manifest_json, why, mtime = None, b"", f"{type(exc).__name__}: {exc}", 0
        if step is None:
            log.warning("dropping segment %s: %s", seg, why)
            seg.unlink(missing_ok=True)
            for companion in _companions(slot):
                _unlink_file(companion)
            return "dropped"
        try:
            source = self._source_on_disk(slot)
        except (OSError, ValueError) as exc:
            self._skip(slot.source_path, "bad_source", f"{exc}; segment {seg.name} is not adopted and left alone")
            return "skipped"
        slot.adopt_sealed(step, manifest_json, mtime, source)
        manifest = Manifest.from_json(manifest_json)
        slot.data_bytes, slot.run, slot.world_size = manifest.data_bytes, manifest.run, manifest.world_size
        self._track_age(rank)
        self._slots.setdefault(rank, []).append(slot)
        log.info("re-adopted rank %d step %d (%s, %d bytes, %s)", rank, step, seg.name, slot.capacity, source.value)
        return "adopted"

    def _source_on_disk(self, slot: Slot) -> Source:
        """The source persisted beside a sealed segment (absent: LOCAL); OSError/ValueError when untrustworthy.

        A `.foreign` marker of an earlier version means FETCHED and is rewritten as a source file.
        """
        legacy = slot.path.with_suffix(_LEGACY_FOREIGN)
        if not os.path.lexists(slot.source_path) and _is_file(legacy):
            _write_source(slot.source_path, Source.FETCHED)
            _unlink_file(legacy)
        return _read_source(slot.source_path)

    def _read_sealed(self, slot: Slot, rank: int) -> tuple[int | None, bytes, str, int]:
        try:
            raw, mtime = _read_private(slot.manifest_path)
        except FileNotFoundError:
            return None, b"", "no manifest (the copy never committed)", 0
        except OSError as exc:
            return None, b"", f"unreadable manifest: {exc}", 0
        try:
            manifest = Manifest.from_json(raw)
            manifest.validate(slot.capacity)
        except (ManifestError, ValueError, RecursionError, TypeError) as exc:
            return None, b"", f"invalid manifest: {type(exc).__name__}: {str(exc)[:200]}", 0
        if manifest.job != self.config.job or manifest.rank != rank:
            return None, b"", f"manifest is for job {manifest.job!r} rank {manifest.rank}", 0
        return manifest.step, raw, "", mtime

    # ---- the snapshot protocol --------------------------------------------------------------

    def note_client(self, rank: int, pid: int) -> bool:
        """Remember the process of `rank` (from Hello): its uncommitted Begin ends when that process is gone.

        Returns False (and tracks nothing) when the pid is not visible here (another pid namespace):
        then only `lease_timeout` ends a stuck lease.
        """
        if not 0 <= rank < MAX_RANK or pid <= 0:
            return False
        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            log.info("rank %d: pid %d is not visible to the daemon; its leases end after lease_timeout only", rank, pid)
            with self._lock:
                self._clients.pop(rank, None)
            return False
        with self._lock:
            self._clients[rank] = (pid, started)
        return True

    def prepare(self, job: str, rank: int, nbytes: int, at_most: int = MAX_RANK) -> tuple[list[tuple[str, int]], bool]:
        """Allocate and pre-fault the segments `rank` writes `nbytes`-byte snapshots into, ahead of its Begins.

        The size comes from the rank's Hello (its Snapshotter announces it at construction). Segments
        are prepared one at a time (PREFAULTING, outside the lock), at most `at_most` in this call,
        until the rank has `segments_per_rank` of at least `nbytes`: free ones, sealed ones it will
        write over next, and one being written; free ones too small are given back. A refusal
        (budget, host memory, a full tmpfs) ends the preparation: logged, and a Begin allocates as it
        always did. Returns (path, capacity) of the rank's free and reusable segments of at least
        `nbytes`, and whether another call would prepare more.
        """
        self._check(job, rank, 0)
        if nbytes <= 0:
            raise RequestRejected(f"expected bytes must be positive, got {nbytes}")
        capacity = -(-nbytes // SEGMENT_ROUNDING) * SEGMENT_ROUNDING
        t0, prepared, more = time.perf_counter(), 0, False
        while True:
            with self._lock:
                self._reap()
                slots = self._slots.setdefault(rank, [])
                for slot in [s for s in slots if s.state is SlotState.FREE and (s.capacity < nbytes or not _intact(s))]:
                    self._delete(rank, slot)
                if len(self._writable(rank, nbytes, in_flight=True)) >= self.config.segments_per_rank:
                    more = False
                    break
                if prepared >= at_most:
                    more = True
                    break
                why = self._refusal(rank, capacity)
                if why is not None:  # not a refused snapshot: no ftd_refused_snapshots_total
                    log.info("rank %d: no more segments of %d bytes prepared ahead: %s", rank, capacity, why[1])
                    break
                try:
                    slot = self._allocate(rank, capacity)
                except OutOfMemory as exc:
                    log.warning("rank %d: segments of %d bytes not prepared ahead: %s", rank, capacity, exc)
                    break
                slot.prefault()
            if not self._fill_ahead(rank, slot):
                break
            prepared += 1
            self.metrics.segments_prepared.inc()
        with self._lock:
            ready = [(str(s.path), s.capacity) for s in self._writable(rank, nbytes, in_flight=False)]
        if prepared:
            log.info("rank %d: prepared %d segment(s) of %d bytes ahead of its snapshots in %.2f s", rank,
                     prepared, capacity, time.perf_counter() - t0)
        return ready, more

    def _writable(self, rank: int, nbytes: int, in_flight: bool) -> list[Slot]:
        """The rank's segments of at least `nbytes` it writes into in turn: free, sealed and evictable (written
        over next), and with `in_flight` those being prepared or written (lock held)."""
        evictable = self._evictable(rank)
        busy = (SlotState.NEW, SlotState.PREFAULTING, SlotState.WRITING) if in_flight else ()
        return [s for s in self._slots.get(rank, []) if s.capacity >= nbytes
                and (s.state is SlotState.FREE or s.state in busy or s in evictable)]

    def begin(self, job: str, rank: int, step: int, nbytes: int) -> Lease:
        """Reserve a segment of at least `nbytes` for (rank, step); supersedes an unfinished one.

        A refused Begin (OutOfMemory) changes nothing: admission is decided before anything is evicted.
        """
        self._check(job, rank, step)
        if nbytes <= 0:
            raise RequestRejected(f"nbytes must be positive, got {nbytes}")
        with self._lock:
            self._reap()
            slots = self._slots.setdefault(rank, [])
            self._entry_caches.setdefault(rank, EntryCache())
            next_lease = self._next_leases.pop(rank, None)
            for slot in slots:
                if slot.state is SlotState.WRITING and slot.lease:  # lease 0 is install_sealed's own copy
                    if slot.step is None and slot.lease == next_lease:  # the rank Begins instead: given up
                        slot.release()
                        continue
                    log.warning("rank %d: step %s was never committed; its segment is reused", rank, slot.step)
                    self.metrics.snapshots_aborted.labels("superseded").inc()
                    slot.release()
            slot = self._free_slot(rank, nbytes, step)
            lease = secrets.randbits(63) or 1
            self._newest_begin[rank] = lease
            now = time.monotonic()
            fresh = slot.state is SlotState.NEW
            if fresh:
                slot.prefault()
            else:
                slot.begin(step, lease, now)
        if fresh:  # outside the lock: other ranks keep committing while this one's pages are faulted in
            try:
                self._fill(rank, slot)
            except OutOfMemory as exc:
                slot = self._reuse_when_full(rank, step, nbytes, lease, exc)
            else:
                self._take_prefaulted(rank, slot, step, lease, now)
                if self.config.preallocate:
                    self._preallocate_later(rank, slot.capacity)
        log.debug("rank %d step %d: writing into %s", rank, step, slot.path.name)
        return Lease(lease, str(slot.path), slot.capacity)

    def _take_prefaulted(self, rank: int, slot: Slot, step: int, lease: int, now: float) -> None:
        """The Begin that prefaulted `slot` takes it (PREFAULTING -> FREE -> WRITING in one hold of the lock).

        When a newer Begin of the rank came meanwhile, the segment stays FREE and this Begin is
        refused (its caller has given up on it): one writer per rank, and no lease to a segment
        another Begin may get.
        """
        with self._lock:
            slot.prefaulted()
            self._refuse_if_superseded(rank, step, lease)
            slot.begin(step, lease, now)

    def _refuse_if_superseded(self, rank: int, step: int, lease: int) -> None:
        if self._newest_begin.get(rank) == lease:
            return
        log.warning("rank %d: step %d was superseded by a newer Begin while its segment was prefaulted", rank, step)
        self.metrics.snapshots_aborted.labels("superseded").inc()
        raise RequestRejected(f"rank {rank} step {step}: superseded by a newer Begin of the rank")

    def _reuse_when_full(self, rank: int, step: int, nbytes: int, lease: int, exc: OutOfMemory) -> Slot:
        """The tmpfs is full: take the oldest evictable sealed segment big enough, keeping at least one step."""
        with self._lock:
            self._refuse_if_superseded(rank, step, lease)
            evictable = [s for s in self._evictable(rank) if _intact(s)]
            victims = [s for s in evictable if s.capacity >= nbytes]
            if len(evictable) < 2 or not victims:
                raise OutOfMemory(f"{exc}; and rank {rank} holds no older segment it can reuse "
                                  f"(sealed steps {self._sealed_steps(rank)})") from exc
            victim = victims[0]
            log.warning("rank %d: %s is full; reusing the segment of step %s for step %d", rank,
                        self.root, victim.step, step)
            self.metrics.refused.labels("shm_full_reused").inc()
            self._evict(victim, "the shm filesystem is full")
            victim.begin(step, lease, time.monotonic())
            return victim

    def commit(self, job: str, rank: int, step: int, lease: int, manifest_json: bytes) -> list[int]:
        """Seal the segment leased for (rank, step) after validating its manifest; return held steps.

        When the manifest cannot be written (ENOSPC) no temp file stays, the lease ends (the segment
        is freed for the next Begin) and OutOfMemory says why.
        """
        self._check(job, rank, step)
        try:
            manifest = Manifest.from_json(manifest_json, self._entry_caches.get(rank))
        except ManifestError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a hostile manifest makes the parser raise
            raise ManifestError(f"manifest is not valid JSON of a manifest: {type(exc).__name__}: {str(exc)[:200]}") from None
        with self._lock:
            slot = self._writing(rank, step, lease)
            leased_ahead = slot.step is None
            if (manifest.job, manifest.rank, manifest.step) != (job, rank, step):
                raise ManifestError(f"manifest is for job {manifest.job!r} rank {manifest.rank} step "
                                    f"{manifest.step}, the commit for job {job!r} rank {rank} step {step}")
            manifest.validate(slot.capacity)
            try:
                _write_private(slot.manifest_path, manifest_json)
            except OutOfMemory:
                slot.release()
                self.metrics.snapshots_aborted.labels("shm_full").inc()
                self.metrics.refused.labels("shm_full").inc()
                raise
            for other in self._slots[rank]:
                if other is not slot and other.state is SlotState.SEALED and other.step == step:
                    self._evict(other, "replaced by a newer copy of the same step")
            if leased_ahead:
                self._next_leases.pop(rank, None)
                slot.step = step
            slot.seal(manifest_json, self._stamp(slot.manifest_path))
            slot.data_bytes, slot.run, slot.world_size = manifest.data_bytes, manifest.run, manifest.world_size
            self._track_age(rank)
            if not leased_ahead:  # leased at the previous Commit: no Begin to measure from
                self.metrics.commit_latency.observe(time.monotonic() - slot.begun_at)
            self.metrics.snapshots_sealed.labels(str(rank)).inc()
            self.metrics.snapshot_bytes.labels(str(rank)).inc(manifest.data_bytes)
            self._retain(rank)
            self._update_gauges(rank)
            held = self._sealed_steps(rank)
        log.info("sealed rank %d step %d (%d bytes); holding steps %s", rank, step, manifest.data_bytes, held)
        return held

    def lease_next(self, job: str, rank: int, nbytes: int) -> Lease | None:
        """A lease for the rank's next snapshot, handed out with a Commit's reply: a FREE segment of at least
        `nbytes` the next Begin would take as it is (nothing is evicted, allocated or pre-faulted for it).
        None when there is none, or the rank has a write in progress: that snapshot Begins as usual.

        The segment is WRITING without a step until the Commit (or Abort) of that lease names one; a Begin
        of the rank gives it up. It is reaped only when the rank's process is gone, not after lease_timeout
        (it waits for the next snapshot, however far off).
        """
        self._check(job, rank, 0)
        if nbytes <= 0:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._reaped_at >= 1.0:
                self._reap()
            slots = self._slots.get(rank, [])
            if any(s.state is SlotState.WRITING for s in slots):  # one writer per rank
                return None
            for slot in sorted((s for s in slots if s.state is SlotState.FREE and s.capacity >= nbytes),
                               key=lambda s: s.capacity):
                if not _intact(slot):  # the next Begin replaces it
                    return None
                lease = secrets.randbits(63) or 1
                self._newest_begin[rank] = self._next_leases[rank] = lease
                slot.begin(None, lease, now)
                return Lease(lease, str(slot.path), slot.capacity)
        return None

    def abort(self, job: str, rank: int, step: int, lease: int, reason: str) -> None:
        self._check(job, rank, step)
        with self._lock:
            slot = self._writing(rank, step, lease)
            if slot.step is None:
                self._next_leases.pop(rank, None)
            slot.release()
        self.metrics.snapshots_aborted.labels("client").inc()
        log.warning("rank %d aborted step %d: %s", rank, step, reason[:200])

    def list_steps(self, job: str, rank: int, world_size: int = 0) -> list[int]:
        """Sealed steps of `rank`; with `world_size`, only those taken by a world of that size."""
        self._check(job, rank, 0)
        with self._lock:
            if not world_size:
                return self._sealed_steps(rank)
            return sorted(s.step for s in self._slots.get(rank, []) if s.state is SlotState.SEALED
                          and s.step is not None and s.world_size in (0, world_size))

    def holdings(self) -> list[Holding]:
        """Every sealed segment here: (rank, step, world size, source, data bytes), for resharding."""
        with self._lock:
            return sorted(Holding(rank, int(s.step), s.world_size, s.source.value, s.data_bytes)
                          for rank, slots in self._slots.items() for s in slots
                          if s.state is SlotState.SEALED and s.step is not None)

    def drop_other_worlds(self, job: str, world_size: int, above_step: int) -> list[tuple[int, int]]:
        """After a reshard onto `world_size`: drop the old worlds' steps above `above_step` (an abandoned
        timeline: the job went on from `above_step`), unpinned ones only. Returns the (rank, step) dropped."""
        self._check(job, 0, max(above_step, 0))
        dropped = []
        with self._lock:
            pinned = self._pinned
            for rank, slots in self._slots.items():
                for slot in list(slots):
                    if (slot.state is SlotState.SEALED and slot.step is not None and slot.step > above_step
                            and slot.world_size not in (0, world_size) and slot.step not in pinned):
                        dropped.append((rank, int(slot.step)))
                        self._evict(slot, f"the job went on at world size {world_size} from step {above_step}")
                self._update_gauges(rank)
        if dropped:
            log.info("dropped %d snapshot(s) of the old world above step %d: %s", len(dropped), above_step, dropped)
        return sorted(dropped)

    def open(self, job: str, rank: int, step: int) -> tuple[str, int, bytes, str]:
        """(path, capacity, manifest JSON, "local" | "peers") of a sealed step (`Source.recovery_source`).

        The manifest is read back from shared memory, not from the copy taken at seal: what is
        restored is what is there now, and the reader verifies it.
        """
        self._check(job, rank, step)
        with self._lock:
            for slot in self._slots.get(rank, []):
                if slot.state is SlotState.SEALED and slot.step == step:
                    try:
                        manifest_json, _ = _read_private(slot.manifest_path)
                    except OSError as exc:
                        raise NotFound(f"rank {rank} step {step}: manifest {slot.manifest_path} is gone: {exc}") from exc
                    self.metrics.restores_served.inc()
                    return str(slot.path), slot.capacity, manifest_json, slot.source.recovery_source
        raise NotFound(f"job {job!r} rank {rank} step {step} is not held here (held: {self.list_steps(job, rank)})")

    def data_of(self, job: str, rank: int, step: int) -> tuple[str, int]:
        """(segment path, data bytes) of sealed (rank, step), without reading its manifest (a peer's range
        reads ask this per request); NotFound when it is not held here."""
        self._check(job, rank, step)
        with self._lock:
            for slot in self._slots.get(rank, []):
                if slot.state is SlotState.SEALED and slot.step == step:
                    return str(slot.path), slot.data_bytes
        raise NotFound(f"job {job!r} rank {rank} step {step} is not held here")

    def source_of(self, job: str, rank: int, step: int) -> Source:
        """Where the sealed (rank, step) came from; NotFound when it is not held here."""
        self._check(job, rank, step)
        with self._lock:
            for slot in self._slots.get(rank, []):
                if slot.state is SlotState.SEALED and slot.step == step:
                    return slot.source
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

    def discard_all(self, job: str) -> list[tuple[int, int]]:
        """Drop every sealed step of the job and give back its free segments (`ftd rm`); (rank, step) dropped.

        Writes in progress are left alone (their Commit still works).
        """
        self._check(job, 0, 0)
        dropped: list[tuple[int, int]] = []
        with self._lock:
            for rank, slots in self._slots.items():
                for slot in list(slots):
                    if slot.state is SlotState.SEALED:
                        dropped.append((rank, int(slot.step)))  # type: ignore[arg-type]
                        self._evict(slot, "discarded (all steps of the job)")
                    if slot.state is SlotState.FREE:
                        self._delete(rank, slot)
                self._update_gauges(rank)
        log.warning("discarded every snapshot of job %r: %d step(s)", job, len(dropped))
        return sorted(dropped)

    def summary(self) -> list[RankSummary]:
        with self._lock:
            return [RankSummary(rank, self._sealed_steps(rank), sum(s.capacity for s in slots),
                                any(s.state is SlotState.WRITING and s.step is not None for s in slots),
                                sorted(int(s.step) for s in self._timeline(rank)[1]))  # type: ignore[arg-type]
                    for rank, slots in sorted(self._slots.items())]

    def held_bytes(self) -> int:
        """Bytes of segments held; ends stuck leases first (parity admission asks this too)."""
        with self._lock:
            self._reap()
            return self._held()

    # ---- what erasure coding needs -----------------------------------------------------------

    def pin(self, steps: set[int], owner: str = "protection") -> None:
        """Keep these steps sealed whatever `keep` says; replaces `owner`'s pins only (others pin independently)."""
        with self._lock:
            if steps:
                self._pins[owner] = set(steps)
            else:
                self._pins.pop(owner, None)
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
                     for s in slots if s.state is SlotState.SEALED and s.step == step and s.source.in_node_blob]
        return sorted(found)

    def newest_sealed_step(self) -> int | None:
        """The step most recently sealed on this node (by seal time, not number); None when none is."""
        with self._lock:
            sealed = [(s.sealed_at_ns, s.step) for slots in self._slots.values() for s in slots
                      if s.state is SlotState.SEALED and s.step is not None]
        return int(max(sealed)[1]) if sealed else None  # type: ignore[arg-type]

    def sealed_at(self, step: int) -> float | None:
        """Wall-clock time (s) the last local rank sealed `step`; None when no local rank holds it."""
        with self._lock:
            stamps = [s.sealed_at_ns for slots in self._slots.values() for s in slots
                      if s.state is SlotState.SEALED and s.step == step]
        return max(stamps) / 1e9 if stamps else None

    def is_empty(self) -> bool:
        with self._lock:
            return not any(self._slots.values())

    def install_sealed(self, rank: int, step: int, manifest_json: bytes, data: memoryview, *,
                       source: Source) -> None:
        """Seal a snapshot rebuilt or fetched from peers as if rank `rank` had committed it.

        `source` (REBUILT: this node's own data; FETCHED: for a rank that moved here, kept out of
        this node's blob) is persisted beside the segment, so a restarted daemon reports it too.
        The payload is verified first: a corrupt one reserves and evicts nothing. The segment is
        reserved under the lock (WRITING with lease 0: nothing hands it out, evicts, supersedes or
        reaps it), written without the lock, so other ranks' Begin/Commit/List go on during a
        large copy, then sealed under the lock. Any failure frees it.
        """
        manifest = Manifest.from_json(manifest_json)
        manifest.validate(len(data))
        manifest.verify(data)
        pending = self.reserve_install(rank, step, len(data))
        try:
            self._copy_into(pending.slot, data)
            pending.seal(manifest_json, source, verified=True)
        finally:
            pending.release()

    def reserve_install(self, rank: int, step: int, nbytes: int) -> PendingInstall:
        """A segment of `nbytes` reserved for (rank, step), to be written in place (a rebuild decodes into
        it) and then sealed with `PendingInstall.seal`, which verifies it first; `release` frees it
        unless it was sealed. Admission is decided here, like a Begin's."""
        with self._lock:
            self._slots.setdefault(rank, [])
            slot = self._free_slot(rank, max(1, nbytes), step)
            slot.begin(step, 0, time.monotonic())  # FREE, or NEW: the writes touch the pages they need
        return PendingInstall(self, rank, step, nbytes, slot)

    def _seal_installed(self, rank: int, step: int, slot: Slot, manifest: Manifest, manifest_json: bytes,
                        source: Source) -> None:
        try:
            _write_source(slot.source_path, source)  # before the manifest: sealed on disk means its source is there
            _write_private(slot.manifest_path, manifest_json)
        except BaseException:
            _unlink_file(slot.manifest_path)
            _unlink_file(slot.source_path)
            raise
        with self._lock:
            slot.seal(manifest_json, self._stamp(slot.manifest_path), source)
            slot.data_bytes, slot.run, slot.world_size = manifest.data_bytes, manifest.run, manifest.world_size
            self._track_age(rank)
            self._retain(rank)
            self._update_gauges(rank)
        log.info("installed rank %d step %d (%d bytes, from %s)", rank, step, manifest.data_bytes, source.value)

    def _copy_into(self, slot: Slot, data: memoryview) -> None:
        """Write `data` at the start of the segment (install_sealed's copy; the lock is not held)."""
        fd = os.open(slot.path, os.O_RDWR | _NOFOLLOW | _CLOEXEC)
        try:
            with os.fdopen(fd, "r+b", closefd=False) as f:
                f.write(data)
        finally:
            os.close(fd)

    # ---- internals (lock held) --------------------------------------------------------------

    def _stamp(self, manifest_path: Path) -> int:
        """The seal time of a segment, also set as its manifest's mtime, strictly after every earlier one.

        Adoption orders what it finds by that mtime; tmpfs records the clock only to a few
        milliseconds on its own, so snapshots sealed close together would tie.
        """
        stamp = self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        try:
            os.utime(manifest_path, ns=(stamp, stamp), follow_symlinks=False)
        except OSError as exc:
            log.warning("cannot stamp %s with its seal time: %s", manifest_path, exc)
        return stamp

    def _check(self, job: str, rank: int, step: int) -> None:
        if job != self.config.job:
            raise RequestRejected(f"this daemon serves job {self.config.job!r}, not {job!r}")
        if not 0 <= rank < MAX_RANK:
            raise RequestRejected(f"rank {rank} is out of range")
        if step < 0:
            raise RequestRejected(f"step {step} is negative")

    def _writing(self, rank: int, step: int, lease: int) -> Slot:
        """The slot of (rank, step, lease): begun for that step, or leased ahead (lease_next) to the rank."""
        for slot in self._slots.get(rank, []):
            if slot.state is SlotState.WRITING and slot.lease == lease and (
                    slot.step == step or (slot.step is None and self._next_leases.get(rank) == lease)):
                return slot
        raise RequestRejected(f"rank {rank} holds no lease {lease} for step {step} (superseded, or the daemon restarted)")

    def _sealed_steps(self, rank: int) -> list[int]:
        return sorted(s.step for s in self._slots.get(rank, []) if s.state is SlotState.SEALED and s.step is not None)

    def _held(self) -> int:
        return sum(s.capacity for slots in self._slots.values() for s in slots)

    def _evictable(self, rank: int) -> list[Slot]:
        """Sealed steps that may make room, in eviction order (see `_timeline`)."""
        current, _ = self._timeline(rank)
        return current

    def _timeline(self, rank: int) -> tuple[list[Slot], list[Slot]]:
        """Unpinned sealed slots: (evictable in eviction order, higher steps of an older timeline).

        The current timeline is the run of the step sealed last and ends at that step; higher steps
        of the same run were sealed before a fresh start and are the stale timeline (owner
        "stale-timeline"), kept until discarded. Steps of another run (another launch of the job,
        never resumed by this one) are evicted first, then the current timeline's, lowest first.
        """
        sealed = [s for s in self._slots.get(rank, []) if s.state is SlotState.SEALED and s.step is not None]
        if not sealed:
            return [], []
        newest = max(sealed, key=lambda s: s.sealed_at_ns)
        pinned = self._pinned
        unpinned = [s for s in sealed if s.step not in pinned]
        ours = [s for s in unpinned if s.run == newest.run]
        others = sorted((s for s in unpinned if s.run != newest.run), key=lambda s: (s.step or 0, s.sealed_at_ns))
        current = sorted((s for s in ours if s.step <= newest.step),  # type: ignore[operator]
                         key=lambda s: (s.step or 0, s.sealed_at_ns))
        return others + current, [s for s in ours if s.step > newest.step]  # type: ignore[operator]

    def _inflight(self) -> int:
        """Bytes of segments created but not yet faulted in: not yet visible in the host's available memory."""
        return sum(s.capacity for slots in self._slots.values() for s in slots
                   if s.state in (SlotState.NEW, SlotState.PREFAULTING))

    def _refusal(self, rank: int, capacity: int, freed: int = 0) -> tuple[str, str] | None:
        """Why a new `capacity`-byte segment cannot be admitted once `freed` bytes are given back; None: it can."""
        budget = self.config.memory_budget
        held = self._held() - freed
        if budget and held + capacity > budget:
            return "budget", (f"a {capacity}-byte segment for rank {rank} would exceed the memory budget "
                              f"({held} of {budget} bytes held)")
        external = self._external() if budget and self._external is not None else 0
        if budget and held + external + capacity > budget:
            return "budget", (f"a {capacity}-byte segment for rank {rank} would exceed the memory budget "
                              f"({held} bytes of segments and {external} of parity held, of {budget})")
        available = psutil.virtual_memory().available + freed - self._inflight()
        if available - capacity < self.config.memory_reserve:
            return "host_memory", (f"a {capacity}-byte segment for rank {rank} would leave {available - capacity} "
                                   f"bytes of host memory available (counting allocations in flight), under the "
                                   f"reserve of {self.config.memory_reserve}")
        return None

    def _refuse(self, rank: int, why: tuple[str, str]) -> OutOfMemory:
        self.metrics.refused.labels(why[0]).inc()
        _, stale = self._timeline(rank)
        hint = (f"; rank {rank} also keeps steps {sorted(s.step for s in stale)} of an older timeline "  # type: ignore[type-var]
                f"(restore them, or `ftd rm` the job to give their memory back)") if stale else ""
        return OutOfMemory(why[1] + hint)

    def _free_slot(self, rank: int, nbytes: int, step: int) -> Slot:
        """A FREE (or, newly allocated, NEW) segment of at least `nbytes` for `rank` to write `step` into.

        Once the rank holds `segments_per_rank` sealed steps below `step`, the oldest one's segment is
        taken (the newest ones stay; higher steps, which a fresh start leaves as an older timeline, are
        never written over). Decides admission first: a refusal evicts nothing.
        """
        slots = self._slots[rank]
        for slot in [s for s in slots if s.state is SlotState.FREE and not _intact(s)]:
            log.warning("rank %d: segment %s was truncated or removed behind the daemon's back; replacing it",
                        rank, slot.path.name)
            self._delete(rank, slot)
        free = sorted((s for s in slots if s.state is SlotState.FREE), key=lambda s: s.capacity)
        fitting = [s for s in free if s.capacity >= nbytes]
        if fitting:
            return fitting[0]
        small = sum(s.capacity for s in free)  # too small for this state: given back once admitted
        evictable = self._evictable(rank)
        capacity = -(-nbytes // SEGMENT_ROUNDING) * SEGMENT_ROUNDING
        # pinned steps and an older timeline's steps keep their own segments, beside this timeline's
        # segments_per_rank: once that many are sealed below `step`, the oldest one's takes the new step
        below = [s for s in evictable if s.step is not None and s.step < step]
        if len(below) < self.config.segments_per_rank:
            why = self._refusal(rank, capacity, freed=small)
            if why is None:
                for slot in free:
                    self._delete(rank, slot)
                return self._allocate(rank, capacity)
            if len(evictable) < 2:
                raise self._refuse(rank, why)
            log.warning("rank %d: memory is short (%s), evicting step %s early", rank, why[1], evictable[0].step)
            victim = evictable[0]
        else:
            victim = below[0]
        if victim.capacity < nbytes:
            why = self._refusal(rank, capacity, freed=small + victim.capacity)
            if why is not None:
                raise self._refuse(rank, why)
        for slot in free:
            self._delete(rank, slot)
        self._evict(victim, "making room")
        if victim.capacity >= nbytes:
            return victim
        self._delete(rank, victim)
        return self._allocate(rank, capacity)

    def _allocate(self, rank: int, capacity: int) -> Slot:
        why = self._refusal(rank, capacity)
        if why is not None:
            raise self._refuse(rank, why)
        directory = self._rank_dir(rank)
        path = directory / f"{secrets.token_hex(8)}.seg"
        mode = 0o660 if self.config.shm_group >= 0 else 0o600
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        except OSError as exc:
            self.metrics.refused.labels("shm_full").inc()
            raise OutOfMemory(f"cannot create a segment in {directory}: {exc}") from exc
        try:
            if self.config.shm_group >= 0:
                os.fchown(fd, -1, self.config.shm_group)
                os.fchmod(fd, mode)  # whatever the umask
            os.ftruncate(fd, capacity)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise OutOfMemory(f"cannot size a {capacity}-byte segment in {directory}: {exc}") from exc
        os.close(fd)
        slot = Slot(path, capacity, state=SlotState.NEW)
        self._slots[rank].append(slot)
        self.metrics.shm_held_bytes.set(self._held())
        return slot

    def _fill(self, rank: int, slot: Slot) -> None:
        """Allocate and touch every page of a PREFAULTING segment (lock not held), so no copy ever page-faults.

        tmpfs pages are only zeroed on first touch; writing zeros here keeps that cost out of the
        trainer's copy. A full tmpfs gives OutOfMemory and the segment is removed. The caller
        moves the slot on (`prefaulted`) under the lock.
        """
        t0 = time.perf_counter()
        try:
            fd = os.open(slot.path, os.O_RDWR | _NOFOLLOW | _CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, slot.capacity)
                for offset in range(0, slot.capacity, len(_ZEROS)):
                    os.pwrite(fd, _ZEROS[:min(len(_ZEROS), slot.capacity - offset)], offset)
            finally:
                os.close(fd)
        except OSError as exc:
            with self._lock:
                if slot in self._slots.get(rank, []):
                    self._delete(rank, slot)
            self.metrics.refused.labels("shm_full").inc()
            raise OutOfMemory(f"cannot allocate {slot.capacity} bytes in {slot.path.parent}: {exc}") from exc
        seconds = time.perf_counter() - t0
        self.metrics.prefault_seconds.observe(seconds)
        log.info("rank %d: allocated segment %s (%d bytes, pre-faulted in %.2f s)", rank, slot.path.name,
                 slot.capacity, seconds)

    def _fill_ahead(self, rank: int, slot: Slot) -> bool:
        """Pre-fault `slot`, allocated (PREFAULTING) ahead of its Begin, outside the lock; False when that
        failed (logged; `_fill` has deleted the slot)."""
        try:
            self._fill(rank, slot)
        except OutOfMemory as exc:
            log.warning("rank %d: preparing a segment ahead failed: %s", rank, exc)
            return False
        with self._lock:
            slot.prefaulted()
        return True

    def _preallocate_later(self, rank: int, capacity: int) -> None:
        """Prepare the rest of the rank's segments_per_rank segments in the background (thread ftd-prealloc-<rank>)."""
        def run() -> None:
            while True:
                with self._lock:
                    slots = self._slots.get(rank, [])
                    if len(slots) >= self.config.segments_per_rank:
                        return
                    try:
                        slot = self._allocate(rank, capacity)
                    except OutOfMemory as exc:
                        log.debug("rank %d: no segment prepared ahead: %s", rank, exc)
                        return
                    slot.prefault()
                if not self._fill_ahead(rank, slot):
                    return

        threading.Thread(target=run, name=f"ftd-prealloc-{rank}", daemon=True).start()

    def _evict(self, slot: Slot, why: str) -> None:
        _unlink_file(slot.manifest_path)
        _unlink_file(slot.source_path)
        log.debug("evicting step %s (%s): %s", slot.step, slot.path.name, why)
        slot.release()

    def _delete(self, rank: int, slot: Slot) -> None:
        _unlink_file(slot.path)
        for companion in _companions(slot):
            _unlink_file(companion)
        self._slots[rank].remove(slot)
        self.metrics.shm_held_bytes.set(self._held())

    def _retain(self, rank: int) -> None:
        """Keep the `keep` highest steps of the current timeline and at most `keep` of an older one."""
        current, stale = self._timeline(rank)
        for slot in current[:max(0, len(current) - self.config.keep)]:
            self._evict(slot, f"keeping the newest {self.config.keep}")
        stale.sort(key=lambda s: (s.step or 0, s.sealed_at_ns))
        for slot in stale[:max(0, len(stale) - self.config.keep)]:
            self._evict(slot, f"keeping the highest {self.config.keep} of an older timeline")
        kept = sorted(int(s.step) for s in stale[-self.config.keep:])  # type: ignore[arg-type]
        if kept and self._stale_logged.get(rank) != kept:
            log.warning("rank %d started over below steps it holds: keeping steps %s of the older timeline "
                        "(owner %s) until a restore or `ftd rm` discards them", rank, kept, STALE_TIMELINE)
        self._stale_logged[rank] = kept
        self.metrics.stale_timeline_steps.labels(str(rank)).set(len(kept))

    def _reap(self) -> None:
        """End uncommitted leases older than `lease_timeout` or whose rank's process is gone (lock held)."""
        now = self._reaped_at = time.monotonic()
        for rank, slots in self._slots.items():
            for slot in list(slots):
                if slot.state is not SlotState.WRITING or not slot.lease:  # lease 0: the daemon's own copy
                    continue
                ahead = slot.step is None  # leased with a Commit: waits for the next snapshot, however far off
                if not ahead and self.config.lease_timeout > 0 and now - slot.begun_at > self.config.lease_timeout:
                    why = "lease_timeout"
                elif not self._client_alive(rank):
                    why = "client_gone"
                else:
                    continue
                if ahead:
                    self._next_leases.pop(rank, None)
                    log.info("rank %d: its process is gone; the segment leased for its next snapshot is reclaimed",
                             rank)
                else:
                    log.warning("rank %d: step %s was begun %.0f s ago and never committed (%s); its segment is "
                                "reclaimed", rank, slot.step, now - slot.begun_at, why)
                    self.metrics.snapshots_aborted.labels(why).inc()
                slot.release()
                self._delete(rank, slot)

    def _client_alive(self, rank: int) -> bool:
        known = self._clients.get(rank)
        if known is None:
            return True
        try:
            process = psutil.Process(known[0])
            return process.create_time() == known[1] and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True

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
    """The segment is still our regular file with its full size (a truncated mapping would SIGBUS the writer)."""
    try:
        st = os.lstat(slot.path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_size == slot.capacity


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _unlink_file(path: Path) -> None:
    """Remove a file or symlink (never what it points to); leave a directory in its place alone."""
    try:
        path.unlink()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _read_private(path: Path, limit: int = MAX_MANIFEST_BYTES) -> tuple[bytes, int]:
    """(content, mtime ns) of a regular file of ours, never through a symlink, at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        if st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{path.name} is owned by uid {st.st_uid}, not the daemon's")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"{path.name} has {st.st_size} bytes, over {limit}")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"{path.name} grew over {limit} bytes")
        return b"".join(chunks), st.st_mtime_ns
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """Write `path` atomically (temp + rename), mode 0600, never through a symlink; no temp is left behind.

    ENOSPC/EDQUOT raise OutOfMemory, other failures FtdError.
    """
    tmp = path.with_suffix(".tmp")
    _unlink_file(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_file(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfMemory(f"cannot write {path.name}: the shm filesystem {path.parent} is full ({exc.strerror})") from None
        raise FtdError(f"cannot write {path}: {exc}") from None


def _parse_rank(name: str) -> int | None:
    try:
        rank = int(name.removeprefix("rank-"))
    except ValueError:
        return None
    return rank if 0 <= rank < MAX_RANK else None


_LEGACY_FOREIGN = ".foreign"  # an earlier version's marker of a FETCHED segment; rewritten at adoption
_COMPANIONS = (".manifest.json", ".source", _LEGACY_FOREIGN)  # files beside `<id>.seg`, removed with it


def _companions(slot: Slot) -> list[Path]:
    return [slot.path.with_suffix(suffix) for suffix in _COMPANIONS]


def _write_source(path: Path, source: Source) -> None:
    """Persist a non-local `source` beside its segment (0600, atomic); LOCAL is the absence of the file."""
    if source is Source.LOCAL:
        _unlink_file(path)
    else:
        _write_private(path, source.value.encode("ascii"))


def _read_source(path: Path) -> Source:
    """The Source in `path` (absent: LOCAL); OSError when it is not a small regular file of ours, ValueError
    when it holds no known value."""
    try:
        raw, _ = _read_private(path, MAX_SOURCE_BYTES)
    except FileNotFoundError:
        return Source.LOCAL
    try:
        return Source(raw.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError too
        raise ValueError(f"{path.name} holds {raw[:MAX_SOURCE_BYTES]!r}, not one of "
                         f"{', '.join(s.value for s in Source)}") from None


class PendingInstall:
    """A segment reserved by `SegmentStore.reserve_install`: written in place, then sealed or released."""

    def __init__(self, store: SegmentStore, rank: int, step: int, nbytes: int, slot: Slot):
        self._store, self.rank, self.step, self.nbytes, self.slot = store, rank, step, nbytes, slot
        self._map: mmap.mmap | None = None
        self._done = False

    def view(self) -> memoryview:
        """The segment's first `nbytes` bytes, writable (mapped once)."""
        if self._map is None:
            fd = os.open(self.slot.path, os.O_RDWR | _NOFOLLOW | _CLOEXEC)
            try:
                self._map = mmap.mmap(fd, max(1, self.nbytes))
            finally:
                os.close(fd)
        return memoryview(self._map)[:self.nbytes]

    def seal(self, manifest_json: bytes, source: Source, verified: bool = False) -> None:
        """Verify what was written against `manifest_json` (ManifestError when it does not match), then seal."""
        manifest = Manifest.from_json(manifest_json)
        if not verified:
            manifest.validate(self.nbytes)
            view = self.view()
            try:
                manifest.verify(view)
            finally:
                view.release()
        self._unmap()
        self._store._seal_installed(self.rank, self.step, self.slot, manifest, manifest_json, source)
        self._done = True

    def _unmap(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still exported: the map goes with the last view
                pass
            self._map = None

    def release(self) -> None:
        """Free the segment unless it was sealed (idempotent)."""
        self._unmap()
        if not self._done:
            self._done = True
            with self._store._lock:
                self.slot.release()
