"""The copy engine: one named background thread per rank that moves a captured step into shm.

For each job: encode the frozen step (`prepare`: what `snapshot()` left to this thread) -> Begin
(get a segment; none when the previous Commit leased one ahead) -> copy every tensor (CPU:
chunked `copy_`; CUDA: a side stream into the registered mapping) -> signal `copied` (the
optimizer may now run) -> checksum the segment -> Commit, asking for the next step's segment
(one RPC per snapshot where the daemon has one free). A `Prepare` request (queued at
construction) maps the segments the daemon prepares ahead of the first Begin. Nothing here
raises into the training loop: every failure becomes a skipped snapshot with a reason.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from xxhash import xxh3_64_intdigest as xxh3

from ftd import knobs
from ftd._proto import snapshot_pb2 as pb
from ftd.client.layoutcache import LayoutCache
from ftd.client.rpc import DaemonClient
from ftd.client.segments import MappedSegment, SegmentCache
from ftd.client.state import Captured
from ftd.config import ClientConfig
from ftd.errors import DaemonUnavailable, FtdError, OutOfMemory, UntrustedDaemon, UntrustedSegment
from ftd.manifest import Entry, Manifest, chunk_checksums, render_entries

log = logging.getLogger(__name__)

COPY_SLICE_BYTES = 64 << 20  # a stop request is honoured within one slice
# A preparing Hello's deadline allows for this many pre-faults at Begin's rate: nothing waits on it
# but a snapshot queued behind it, and one given up on leaves its segment to a later Begin unmapped.
PREPARE_DEADLINE_SEGMENTS = 10


@dataclass
class Prepare:
    """Ask the daemon for segments of `nbytes` ahead of the first snapshot, and map them (ftd-copy-<rank>).

    One segment per round; a round that leaves more to prepare queues the request again behind any
    snapshot already waiting, so a snapshot waits for at most one segment's preparation."""

    nbytes: int
    world_size: int
    done: threading.Event = field(default_factory=threading.Event)
    mapped: int = 0  # segments mapped ahead
    failure: str = ""  # why the last round prepared nothing (empty: none failed)


class SkipStep(Exception):
    """Raised by a job's `prepare`: the step is skipped for `reason` (the Snapshotter logs `detail`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class CopyJob:
    """One step on its way into the daemon."""

    captured: Captured | None
    world_size: int
    stall_to_report: float
    cuda_ready: Any = None  # a CUDA event recorded on the training stream after optimizer.step
    prepare: Callable[[], Captured] | None = None  # builds `captured` on the copy thread (may raise SkipStep)
    copied: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    abandon: threading.Event = field(default_factory=threading.Event)
    step: int = -1
    nbytes: int = 0
    copy_seconds: float = 0.0
    outcome: str = "pending"  # sealed | skipped:<reason> | abandoned
    detail: str = ""  # why a step was skipped, for the Snapshotter's log line (SkipStep)


class CopyEngine:
    """Runs CopyJobs one at a time on thread `ftd-copy-<rank>`."""

    def __init__(self, client: DaemonClient, config: ClientConfig, rank: int,
                 on_done: Callable[[CopyJob], None]):
        self.client, self.config, self.rank = client, config, rank
        self.on_done = on_done
        self.cache = SegmentCache(register_cuda=torch.cuda.is_available())
        self._jobs: queue.Queue[CopyJob | Prepare | None] = queue.Queue()
        self._connected: bool | None = None
        self._stream: Any = None
        self._warned: set[str] = set()
        self._layouts = LayoutCache()
        self._ahead: pb.BeginReply | None = None  # the segment the last Commit leased for the next step
        self.errors = 0  # unexpected exceptions caught at the thread boundary
        self._thread = threading.Thread(target=self._run, name=f"ftd-copy-{rank}", daemon=True)
        self._thread.start()

    def submit(self, job: CopyJob) -> None:
        if job.captured is not None:
            job.step = job.captured.step
        self._jobs.put(job)

    def prepare(self, nbytes: int, world_size: int) -> Prepare:
        """Have the copy thread announce `nbytes` in a Hello and map the segments the daemon prepares."""
        request = Prepare(nbytes, world_size)
        self._jobs.put(request)
        return request

    def close(self, timeout: float) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("copy thread of rank %d did not stop within %.0f s", self.rank, timeout)
        else:
            self._layouts = LayoutCache()  # with its views, so the mappings close now
            self.cache.close()

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: never dies from an exception (each one is logged and counted as a skip)."""
        while True:
            try:
                job = self._jobs.get()
                if job is None:
                    return
                if isinstance(job, Prepare):
                    if self._prepare(job):
                        self._jobs.put(job)
                else:
                    self._run_one(job)
            except BaseException:  # noqa: BLE001 - the thread boundary; logged, and the thread goes on
                self.errors += 1
                log.exception("rank %d: the copy thread hit an unexpected error; it carries on", self.rank)

    def _run_one(self, job: CopyJob) -> None:
        try:
            job.outcome = self._process(job)
        except SkipStep as exc:
            job.outcome, job.detail = f"skipped:{exc.reason}", exc.detail
        except UntrustedDaemon as exc:
            self._connected = False
            log.log(logging.ERROR if "untrusted_daemon" not in self._warned else logging.DEBUG,
                    "rank %d: snapshot of step %d not sent: %s", self.rank, job.step, exc)
            self._warned.add("untrusted_daemon")
            job.outcome = "skipped:untrusted_daemon"
        except UntrustedSegment as exc:
            self._warn_once("untrusted_segment", "rank %d: snapshot of step %d skipped: %s", self.rank, job.step, exc)
            job.outcome = "skipped:untrusted_segment"
        except DaemonUnavailable as exc:
            self._set_connected(False, str(exc))
            job.outcome = "skipped:daemon_unavailable"
        except OutOfMemory as exc:
            self._warn_once("out_of_memory", "rank %d: snapshot of step %d refused: %s", self.rank, job.step, exc)
            job.outcome = "skipped:out_of_memory"
        except FtdError as exc:
            self._warn_once("rejected", "rank %d: snapshot of step %d failed: %s", self.rank, job.step, exc)
            job.outcome = "skipped:rejected"
        except Exception:  # the thread boundary: nothing may reach the training loop
            self.errors += 1
            log.exception("rank %d: snapshot of step %d failed unexpectedly", self.rank, job.step)
            job.outcome = "skipped:error"
        finally:
            job.captured = job.prepare = None
            job.copied.set()
            job.finished.set()
            try:
                self.on_done(job)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("rank %d: recording the outcome of step %d failed", self.rank, job.step)

    def _prepare(self, request: Prepare) -> bool:
        """One round: Hello with the expected size, then map (MAP_POPULATE, CUDA registration) the segments it
        lists that are not mapped yet. True when another round would prepare more.

        A failure only means a snapshot prepares its segment itself, as without an announcement: logged at
        info, never raised; the connection state is left to the first snapshot.
        """
        more = False
        try:
            reply = self.client.hello(request.world_size, request.nbytes, PREPARE_DEADLINE_SEGMENTS)
            self._set_connected(True, "")
            trust = self.client.segment_trust()
            for seg in reply.segments:
                if not self.cache.maps(seg.path, seg.capacity):
                    self.cache.get(seg.path, seg.capacity, trust)
                    request.mapped += 1
            more = reply.more_segments
        except FtdError as exc:
            request.failure = f"{type(exc).__name__}: {exc}"
            log.info("rank %d: segments not prepared ahead (%s); snapshots prepare their own", self.rank, exc)
        except Exception:  # noqa: BLE001 - the thread boundary
            self.errors += 1
            log.exception("rank %d: preparing segments ahead failed unexpectedly", self.rank)
        if not more:
            request.done.set()
        return more

    def _warn_once(self, reason: str, message: str, *args: Any) -> None:
        """Warn the first time a skip reason occurs; later ones are debug lines (the Snapshotter counts them)."""
        first = reason not in self._warned
        self._warned.add(reason)
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def _process(self, job: CopyJob) -> str:
        if job.captured is None and job.prepare is not None:
            job.captured, job.prepare = job.prepare(), None
        cap = job.captured
        assert cap is not None
        if not self._connected:
            self.client.hello(job.world_size)
            self._set_connected(True, "")
        laid = self._layouts.get(cap.specs)
        entries, total = laid.entries, laid.total
        lease, ahead = self._lease(cap.step, total)
        job.nbytes = total
        try:
            seg = self.cache.get(lease.path, lease.capacity, self.client.segment_trust())
        except UntrustedSegment:
            with contextlib.suppress(FtdError):
                self.client.abort(cap.step, lease.lease, "the trainer refused to map the segment")
            raise
        except OSError as exc:
            if not ahead:
                raise
            # the segment leased ahead is gone (a daemon restarted in this process): nothing is copied yet
            log.info("rank %d: the segment leased for step %d is gone (%s); it Begins", self.rank, cap.step, exc)
            lease = self.client.begin(cap.step, max(total, 1))
            seg = self.cache.get(lease.path, lease.capacity, self.client.segment_trust())
        held = laid.views.get(seg.path)
        if held is None or held[0] is not seg:  # first step into this mapping with this layout
            laid.views = {p: v for p, v in laid.views.items() if self.cache.holds(v[0])}  # type: ignore[arg-type]
            held = laid.views[seg.path] = (seg, self._entry_views(seg, entries))
        t0 = time.perf_counter()
        self._copy_all(job, seg, held[1])
        job.copy_seconds = time.perf_counter() - t0
        if job.abandon.is_set():
            self.client.abort(cap.step, lease.lease, "optimizer.step could not wait any longer")
            log.warning("rank %d: step %d abandoned: the copy outlasted max_stall=%.0fs", self.rank, cap.step,
                        self.config.max_stall)
            return "abandoned"
        job.copied.set()
        cap.sources.clear()
        data = seg.memoryview()
        chunk = self.config.chunk_bytes
        sums = [(xxh3(data[e.offset:e.offset + e.nbytes]),) if 0 < e.nbytes <= chunk
                else chunk_checksums(data[e.offset:e.offset + e.nbytes], chunk) for e in entries]
        del data
        manifest = Manifest(job=self.config.job, rank=self.rank, world_size=job.world_size, step=cap.step,
                            chunk_bytes=chunk, data_bytes=total, entries=tuple(entries), meta=cap.meta,
                            created_at=time.time(), run=self.config.run, metrics=cap.metrics)
        reply = self.client.commit_leasing(cap.step, lease.lease, manifest.to_json(render_entries(laid.template, sums)),
                                           job.copy_seconds, job.stall_to_report,
                                           max(total, 1) if self.client.same_daemon() else 0)
        if reply.next_lease:
            self._ahead = pb.BeginReply(lease=reply.next_lease, path=reply.next_path, capacity=reply.next_capacity)
        return "sealed"

    def _lease(self, step: int, total: int) -> tuple[Any, bool]:
        """The segment to write `step` into, and whether it was leased ahead: the one the last Commit leased,
        when it is large enough and the daemon that leased it still runs (a restarted one knows nothing of
        it); else a Begin's."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.capacity >= total and self.client.same_daemon():
            return ahead, True
        return self.client.begin(step, max(total, 1)), False  # gives up a lease ahead the daemon may still hold

    @staticmethod
    def _entry_views(seg: MappedSegment, entries: list[Entry]) -> list[torch.Tensor]:
        """Typed views of `seg` for `entries` (kept per layout and segment in the LayoutCache's LaidOut)."""
        return [seg.entry(e) for e in entries]

    def _copy_all(self, job: CopyJob, seg: MappedSegment, views: list[torch.Tensor]) -> None:
        cap = job.captured
        assert cap is not None
        hooks = knobs.get()
        pause_at = len(views) // 2 if cap.step == hooks.pause_copy_at_step else -1
        on_cuda = any(src.is_cuda for src in cap.sources)
        if on_cuda:
            self._stream = self._stream or torch.cuda.Stream()
            if job.cuda_ready is not None:
                self._stream.wait_event(job.cuda_ready)
        with torch.no_grad(), (torch.cuda.stream(self._stream) if on_cuda else contextlib.nullcontext()):
            for i, (view, src) in enumerate(zip(views, cap.sources)):
                if i == pause_at:
                    log.warning("rank %d: test hook pause half-way through the copy of step %d", self.rank, cap.step)
                    job.abandon.wait(hooks.pause_copy_seconds)
                if job.abandon.is_set():
                    return
                _copy_tensor(view, src)
        if on_cuda:
            self._stream.synchronize()

    def _set_connected(self, up: bool, why: str) -> None:
        if up and self._connected is False:
            log.info("rank %d: daemon at unix:%s is back; snapshots resume", self.rank, self.client.socket_path)
        elif not up and self._connected is not False:
            log.warning("rank %d: daemon at unix:%s unavailable (%s); training continues, snapshots are "
                        "skipped until it is back", self.rank, self.client.socket_path, why)
        if not up:  # whatever it leased ahead is Begun afresh
            self._ahead = None
        self._connected = up


def _copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into the segment view `dst`, in slices when it is large and contiguous."""
    nbytes = dst.numel() * dst.element_size()
    non_blocking = src.is_cuda
    if nbytes <= COPY_SLICE_BYTES or not src.is_contiguous() or dst.dim() == 0:
        dst.copy_(src, non_blocking=non_blocking)
        return
    flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)
    step = max(1, COPY_SLICE_BYTES // dst.element_size())
    for i in range(0, flat_dst.numel(), step):
        flat_dst[i:i + step].copy_(flat_src[i:i + step], non_blocking=non_blocking)

