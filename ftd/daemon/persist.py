"""The daemon's durable tier: persisting cadence steps, and serving them back as a recovery source.

`Persister` (thread `ftd-durable`) writes every step that is a multiple of `durable_every` (and,
with `durable_every_seconds`, each proposed step; see `_proposals`), once every local rank has
sealed it, from shared memory to `durable_dir` (ftd.durable.writer), and commits the step when every rank of the job is there. Nothing runs in the training processes.
A step is pinned (owner "durable") from its first seal until its files are written, so retention
cannot evict it meanwhile; when a newer cadence step is complete before an older one was
started, the older one is skipped (newest wins, like a checkpoint that cannot keep up). Writes
are paced by `durable_bandwidth` and run at a lower CPU/I/O priority than protection.

As a recovery source (the chain's last, after the peers) it lists committed steps and brings a
rank's segment of one back into local memory, verified, with source DURABLE.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from ftd import knobs
from ftd.config import DaemonConfig
from ftd.daemon.slots import Source
from ftd.daemon.store import SegmentStore
from ftd.durable import layout, reader, writer
from ftd.durable.reader import DurableCorrupt, DurableStep
from ftd.durable.writer import Throttle
from ftd.errors import ConfigError, FtdError, NotFound
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

PASS_INTERVAL_S = 0.2
COMMIT_WAIT_S = 600.0  # how long written ranks wait for the rest of the job before the step is given up


class Persister:
    """Writes this node's ranks of cadence steps to the durable tier and commits complete steps."""

    name = "durable"

    def __init__(self, config: DaemonConfig, store: SegmentStore, metrics: DaemonMetrics):
        self.config, self.store, self.metrics = config, store, metrics
        self.root = layout.job_dir(config.durable_dir, config.job)
        self.tag = f"{config.node.replace('/', '_')}-{os.getpid()}-{secrets.token_hex(3)}"  # temp-file names
        self._lock = threading.Lock()
        self._wanted: set[int] = set()  # cadence steps some local rank sealed, not yet written (pinned)
        self._writing: int | None = None  # the step being written (pinned too)
        self._written: dict[int, tuple[int, float, float]] = {}  # step -> (world, sealed at, written at)
        self._durable = -1
        self._wake, self._stop = threading.Event(), threading.Event()
        self._throttle = Throttle(config.durable_bandwidth, self._stop)
        self._thread: threading.Thread | None = None
        self._seals: deque[tuple[int, float]] = deque(maxlen=64)  # (step, monotonic time) of recent seals
        self._committed_at = time.time()  # of the newest durable step (the daemon's start until one is seen)
        self._proposed, self._proposed_at = -1, -math.inf

    # ---- lifetime ---------------------------------------------------------------------------

    def start(self) -> Persister:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise ConfigError(f"cannot create the durable directory {self.root}: {exc.strerror}") from None
        if self.root.is_symlink() or not self.root.is_dir():
            raise ConfigError(f"durable directory {self.root} is not a directory (or is a symlink)")
        self._note_committed()
        every = self.config.durable_every
        for step in self.store.complete_steps():
            if every and step % every == 0:
                self._want(step)
        log.info("durable tier at %s: every %s steps, every %s s, keeping %d, %s; newest durable step %s",
                 self.root, self.config.durable_every or "-", self.config.durable_every_seconds or "-",
                 self.config.durable_keep,
                 f"at most {self.config.durable_bandwidth} B/s" if self.config.durable_bandwidth else "unthrottled",
                 self._durable if self._durable >= 0 else "none")
        self._thread = threading.Thread(target=self._run, name="ftd-durable", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # ---- what the servicer tells it -----------------------------------------------------------

    def notify_sealed(self, rank: int, step: int) -> None:
        """A local rank sealed `step`: pin it when it is a cadence step newer than the durable one."""
        self._seals.append((step, time.monotonic()))
        every = self.config.durable_every
        if every and step % every == 0:
            self._want(step)

    def _want(self, step: int) -> None:
        """Pin `step` (sealed or still to come) until it is written."""
        if step <= self._durable:
            return
        with self._lock:
            if step in self._wanted or step in self._written or step == self._writing:
                return
            self._wanted.add(step)
        self._pin()
        self._wake.set()

    def _pin(self) -> None:
        """Pin (owner "durable") the wanted steps and the one being written: its segments are read until done."""
        with self._lock:
            pins = self._wanted | ({self._writing} if self._writing is not None else set())
        self.store.pin(pins, owner="durable")

    @property
    def durable_step(self) -> int:
        """The newest committed step seen (-1: none)."""
        return self._durable

    # ---- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        while not self._stop.is_set():
            self._wake.wait(PASS_INTERVAL_S)
            self._wake.clear()
            try:
                self._pass()
            except writer.Stopped:
                return
            except Exception:  # noqa: BLE001 - the thread must survive whatever one pass meets
                log.exception("durable tier: a pass failed; retrying")
                self.metrics.thread_errors.labels("ftd-durable").inc()

    def _pass(self) -> None:
        if self.config.durable_every_seconds:
            self._proposals()
        self._commit_written()
        complete = self.store.complete_steps()
        with self._lock:
            ready = [s for s in self._wanted if s in complete]
            if not ready:
                return
            step = max(ready)
            skipped = sorted(s for s in self._wanted if s < step)
            self._wanted -= set(skipped) | {step}
            self._writing = step
        for old in skipped:
            log.info("durable tier: step %d skipped, step %d is complete first", old, step)
            self.metrics.durable_steps.labels("skipped").inc()
        try:
            self._write(step, complete[step])
        finally:
            with self._lock:
                self._writing = None
            self._pin()
        self._commit_written()

    def _proposals(self) -> None:
        """The time cadence, agreed through the durable directory itself.

        Every daemon writes every open step: a step directory newer than the durable step without a
        commit marker. When `durable_every_seconds` passed since the newest commit (and no proposal
        of ours is pending), this daemon opens one: the step about `durable_lookahead_s` of steps
        after the newest seal, by the recent step rate, so that every daemon sees it before sealing
        it and pins it in time. A proposal no daemon can complete is replaced after
        `durable_proposal_retry_s` and removed by the next commit's pruning.
        """
        for child in self.root.iterdir():
            step = layout.step_of(child.name)
            if step is not None and step > self._durable and not (child / layout.COMMIT).exists():
                self._want(step)
        now, hooks = time.time(), knobs.get()
        if now - self._committed_at < self.config.durable_every_seconds:
            return
        if self._proposed > self._durable and now - self._proposed_at < hooks.durable_proposal_retry_s:
            return  # ours is still on its way
        newest = self.store.newest_sealed_step()
        if newest is None:
            return
        step = newest + self._lookahead(hooks.durable_lookahead_s)
        layout.step_dir(self.config.durable_dir, self.config.job, step).mkdir(exist_ok=True, mode=0o750)
        self._proposed, self._proposed_at = step, now
        log.info("durable tier: %.0f s since the last durable step; proposed step %d (newest seal %d)",
                 now - self._committed_at, step, newest)
        self._want(step)

    def _lookahead(self, seconds: float) -> int:
        """Steps sealed in about `seconds` at the recent rate (at least 2)."""
        seals = list(self._seals)
        if len(seals) < 2 or seals[-1][1] <= seals[0][1]:
            return 2
        rate = (seals[-1][0] - seals[0][0]) / (seals[-1][1] - seals[0][1])
        return max(2, math.ceil(rate * seconds))

    def _write(self, step: int, parts: list[tuple[int, str, int, bytes]]) -> None:
        sealed_at = self.store.sealed_at(step) or time.time()
        path = layout.step_dir(self.config.durable_dir, self.config.job, step)
        t0 = time.monotonic()
        self._throttle.restart()
        world, nbytes = -1, 0
        try:
            path.mkdir(exist_ok=True, mode=0o750)
            for rank, segment, _, manifest_json in parts:
                record = writer.write_rank(path, segment, manifest_json, self._throttle, self.tag)
                world = record.world_size
                nbytes += record.tensors_bytes + record.raw_bytes
        except writer.Stopped:
            raise
        except (OSError, FtdError) as exc:
            log.warning("durable tier: step %d not written: %s", step, exc)
            self.metrics.durable_steps.labels("failed").inc()
            return
        seconds = time.monotonic() - t0
        self.metrics.durable_bytes.inc(nbytes)
        self.metrics.durable_write_seconds.observe(seconds)
        self.metrics.durable_steps.labels("written").inc()
        log.info("durable tier: wrote ranks %s of step %d (%.1f MB in %.2f s, %.0f MB/s)",
                 [p[0] for p in parts], step, nbytes / 1e6, seconds, nbytes / 1e6 / max(seconds, 1e-9))
        with self._lock:
            self._written[step] = (world, sealed_at, time.time())

    def _commit_written(self) -> None:
        with self._lock:
            pending = dict(self._written)
        for step, (world, sealed_at, written_at) in sorted(pending.items()):
            path = layout.step_dir(self.config.durable_dir, self.config.job, step)
            try:
                done = writer.try_commit(path, world, self.tag)
            except (OSError, FtdError) as exc:
                log.warning("durable tier: step %d cannot commit: %s", step, exc)
                self.metrics.durable_steps.labels("failed").inc()
                done = None
            if done is False and step > self._durable and time.time() - written_at < COMMIT_WAIT_S:
                continue
            with self._lock:
                self._written.pop(step, None)
            if done:
                log.info("durable tier: step %d committed (world %d), %.2f s after its seal", step, world,
                         time.time() - sealed_at)
                self.metrics.durable_steps.labels("committed").inc()
                self.metrics.seal_to_durable.observe(max(0.0, time.time() - sealed_at))
            elif done is False:
                log.warning("durable tier: step %d given up: not every rank of the job wrote it", step)
                self.metrics.durable_steps.labels("failed").inc()
        self._note_committed()

    def _note_committed(self) -> None:
        committed = reader.committed_steps(self.root)
        if committed and committed[-1] > self._durable:
            self._durable = committed[-1]
            self._committed_at = time.time()
            self.metrics.durable_step.set(self._durable)
            removed = writer.prune(self.root, self.config.durable_keep)
            if removed:
                log.info("durable tier: removed steps %s (keeping %d)", removed, self.config.durable_keep)
        newest = self.store.newest_sealed_step()
        if newest is not None and self._durable >= 0:
            self.metrics.durable_lag_steps.set(max(0, newest - self._durable))

    # ---- a recovery source ------------------------------------------------------------------

    def steps(self, rank: int, world_size: int = 0) -> list[int]:
        """Committed steps that hold `rank`, of `world_size` ranks when it is given (another world reshards)."""
        return [step for step, world in reader.committed_worlds(self.root).items()
                if rank < world and (not world_size or world == world_size)]

    def fetch(self, job: str, rank: int, step: int) -> None:
        """Bring rank `rank`'s segment of durable step `step` into local memory, verified."""
        if step not in reader.committed_steps(self.root):
            raise NotFound(f"rank {rank} step {step} is not in the durable tier {self.root}")
        t0 = time.monotonic()
        try:
            manifest_json, data = DurableStep.open(self.root, step).segment(rank)
        except DurableCorrupt as exc:
            log.error("durable tier: step %d of rank %d is unusable: %s", step, rank, exc)
            self.metrics.checksum_failures.labels("durable").inc()
            raise NotFound(f"durable step {step} of rank {rank} failed verification: {exc}") from None
        self.store.install_sealed(rank, step, manifest_json, memoryview(data), source=Source.DURABLE)
        self.metrics.durable_restores.inc()
        log.info("durable tier: rank %d step %d read back (%.1f MB in %.2f s)", rank, step, len(data) / 1e6,
                 time.monotonic() - t0)


def durable_root(config: DaemonConfig) -> Path | None:
    """The job's durable directory, None when no tier is configured."""
    return layout.job_dir(config.durable_dir, config.job) if config.durable_dir else None
