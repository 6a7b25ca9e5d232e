"""`ftd daemon`: the snapshot manager process. gRPC servicer over the SegmentStore.

The servicer only translates protobuf <-> plain values and ftd errors -> gRPC status codes:
the store holds the snapshots, the recovery chain (ftd.daemon.sources) decides where a restore
comes from, and the node's Redundancy (ftd.daemon.redundancy) protects and fetches.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ftd._version import __version__
from ftd._proto import snapshot_pb2 as pb
from ftd._proto import snapshot_pb2_grpc as pb_grpc
from ftd.config import DaemonConfig
from ftd.codec import make_codec
from ftd.daemon import unixsock
from ftd.daemon.erasure import ErasureCoding
from ftd.daemon.peers import Membership
from ftd.daemon.persist import Persister
from ftd.daemon.redundancy import NoRedundancy, Redundancy
from ftd.daemon.sources import NotReady, RecoveryChain
from ftd.daemon.store import SegmentStore
from ftd.daemon.worlds import WorldCatalog
from ftd.durable import layout, writer
from ftd.durable.layout import RankRecord
from ftd.errors import FtdError, ManifestError, NotFound, OutOfMemory, RequestRejected
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
T = TypeVar("T")
MAX_WORLD = 1 << 20
MAX_RANGES = 4096
MAX_READ_RANGES_BYTES = 64 << 20
"""Bytes one ReadRanges reply carries at most (the rank asks again for more)."""


class BadArgument(RequestRejected):
    """A request's argument is malformed whatever the daemon holds (INVALID_ARGUMENT)."""


def _status_for(exc: FtdError) -> grpc.StatusCode:
    if isinstance(exc, OutOfMemory):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, (ManifestError, BadArgument)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, RequestRejected):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, NotReady):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class SnapshotServicer(pb_grpc.SnapshotServicer):
    """Rank -> daemon snapshot service (proto/ftd/v1/snapshot.proto)."""

    def __init__(self, config: DaemonConfig, store: SegmentStore, redundancy: Redundancy | None = None,
                 durable: Persister | None = None):
        self.config = config
        self.store = store
        self.redundancy: Redundancy = redundancy if redundancy is not None else NoRedundancy()
        self.durable = durable
        self.recovery = RecoveryChain(store, self.redundancy, durable)
        self._worlds_lock = threading.Lock()
        self._reshards: dict[int, pb.ReshardReport] = {}
        self._reshards_lock = threading.Lock()

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float:
        """When the caller stops waiting, less a margin to answer in time."""
        remaining = context.time_remaining()
        return time.monotonic() + (remaining if remaining is not None else 600.0) - 1.0

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FtdError as exc:
            code = _status_for(exc)
            level = logging.WARNING if code is not grpc.StatusCode.NOT_FOUND else logging.DEBUG
            log.log(level, "refused (%s): %s", code.name, exc)
            context.abort(code, str(exc))
            raise  # unreachable: abort raises
        except Exception as exc:  # noqa: BLE001 - a bug or a hostile request: a clear status, no traceback sent
            log.exception("internal error serving a request")
            self.store.metrics.thread_errors.labels("ftd-rpc").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the daemon: {type(exc).__name__}: "
                          f"{str(exc)[:200]} (see the daemon's log)")
            raise  # unreachable: abort raises

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        if request.job != self.config.job:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this daemon serves job {self.config.job!r}, not {request.job!r}")
        log.info("rank %d of %d (pid %d) connected", request.rank, request.world_size, request.pid)
        self.store.note_client(request.rank, request.pid)
        segments, more = [], False
        if request.expected_bytes and self.config.preallocate:  # one segment per Hello: a Begin never waits long
            segments, more = self._call(context, lambda: self.store.prepare(request.job, request.rank,
                                                                            request.expected_bytes, at_most=1))
        return pb.HelloReply(job=self.config.job, node=self.config.node, shm_dir=self.config.shm_dir,
                             pid=os.getpid(), version=__version__, more_segments=more,
                             segments=[pb.PreparedSegment(path=p, capacity=c) for p, c in segments])

    def Begin(self, request: pb.BeginRequest, context: grpc.ServicerContext) -> pb.BeginReply:
        lease = self._call(context, lambda: self.store.begin(request.job, request.rank, request.step, request.nbytes))
        return pb.BeginReply(lease=lease.lease, path=lease.path, capacity=lease.capacity)

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitReply:
        held = self._call(context, lambda: self.store.commit(request.job, request.rank, request.step, request.lease,
                                                             request.manifest_json))
        if request.copy_seconds > 0:
            self.store.metrics.client_copy.observe(request.copy_seconds)
        if request.stall_seconds >= 0:
            self.store.metrics.client_stall.observe(request.stall_seconds)
        self.redundancy.notify_sealed(request.rank, request.step)
        if self.durable is not None:
            self.durable.notify_sealed(request.rank, request.step)
        nxt = self._lease_next(request) if request.next_nbytes else None
        if nxt is None:
            return pb.CommitReply(held_steps=held)
        return pb.CommitReply(held_steps=held, next_lease=nxt.lease, next_path=nxt.path, next_capacity=nxt.capacity)

    def _lease_next(self, request: pb.CommitRequest) -> Any:
        """The lease for the rank's next snapshot a Commit asked for, or None. Never raises: the step is sealed
        whatever happens here, and the next snapshot can always Begin."""
        try:
            return self.store.lease_next(request.job, request.rank, request.next_nbytes)
        except Exception:  # noqa: BLE001 - a bug here must not fail a Commit that sealed its step
            log.exception("leasing the next segment of rank %d failed; its next snapshot Begins", request.rank)
            self.store.metrics.thread_errors.labels("ftd-rpc").inc()
            return None

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        self._call(context, lambda: self.store.abort(request.job, request.rank, request.step, request.lease,
                                                     request.reason))
        return pb.AbortReply()

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListReply:
        """Steps of the rank held here or by any other source (Open fetches the ones that are not here)."""
        deadline = self._deadline(context)
        steps = self._call(context, lambda: self.recovery.steps(request.job, request.rank, deadline,
                                                                request.world_size))
        return pb.ListReply(steps=steps)

    def Open(self, request: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenReply:
        """A sealed step of a rank, from the first recovery source that holds it."""
        deadline = self._deadline(context)
        opened = self._call(context, lambda: self.recovery.open(request.job, request.rank, request.step, deadline,
                                                                request.world_size))
        return pb.OpenReply(path=opened.path, capacity=opened.capacity, manifest_json=opened.manifest_json,
                            source=opened.source)

    def Recovered(self, request: pb.RecoveredRequest, context: grpc.ServicerContext) -> pb.RecoveredReply:
        source = request.source if request.source in ("local", "peers", "durable", "checkfree", "resharded",
                                                      "none") else "other"
        metrics = self.store.metrics
        metrics.recoveries.labels(source).inc()
        metrics.recovery_seconds.labels(source).observe(max(0.0, request.seconds))
        if request.old_world_size:
            self._reshard_reported(request)
        else:
            log.info("rank %d recovered step %d from %s in %.2f s (%d bytes)", request.rank, request.step, source,
                     request.seconds, request.bytes)
        return pb.RecoveredReply()

    def _reshard_reported(self, request: pb.RecoveredRequest) -> None:
        metrics = self.store.metrics
        metrics.reshards.inc()
        metrics.reshard_seconds.observe(max(0.0, request.seconds))
        metrics.reshard_bytes.labels("local").inc(request.bytes_local)
        metrics.reshard_bytes.labels("peers").inc(request.bytes_peers)
        metrics.reshard_bytes.labels("decoded").inc(request.bytes_decoded)
        log.info("rank %d resharded step %d from world %d onto world %d in %.2f s: %d bytes from this node's "
                 "memory, %d from peers (%d of them decoded from a lost node's parity)", request.rank, request.step,
                 request.old_world_size, request.world_size, request.seconds, request.bytes_local,
                 request.bytes_peers, request.bytes_decoded)
        with self._reshards_lock:
            self._reshards[request.rank] = pb.ReshardReport(
                rank=request.rank, step=request.step, old_world_size=request.old_world_size,
                world_size=request.world_size, bytes_local=request.bytes_local, bytes_peers=request.bytes_peers,
                bytes_decoded=request.bytes_decoded, seconds=request.seconds, at=time.time())
        try:
            self.store.drop_other_worlds(request.job, request.world_size, request.step)
        except FtdError as exc:
            log.warning("could not drop the old world's steps above %d: %s", request.step, exc)

    def Worlds(self, request: pb.WorldsRequest, context: grpc.ServicerContext) -> pb.WorldsReply:
        """The whole steps of other world sizes, each old rank's holder and manifest (ftd.daemon.worlds)."""
        deadline = self._deadline(context)
        return self._call(context, lambda: self._worlds(request, deadline))

    def _worlds(self, request: pb.WorldsRequest, deadline: float) -> pb.WorldsReply:
        if request.job != self.config.job:
            raise RequestRejected(f"this daemon serves job {self.config.job!r}, not {request.job!r}")
        if not 0 < request.world_size <= MAX_WORLD:
            raise RequestRejected(f"world size {request.world_size} is out of range")
        self.recovery.wait_ready(deadline)
        catalog = WorldCatalog(request.job, self.store, self.redundancy.group_view())
        with self._worlds_lock:  # the ranks of a node ask at once: one of them decodes, the others see it
            steps = catalog.whole_steps(request.world_size, request.decode, deadline)
        reply = pb.WorldsReply()
        for ws in steps:
            out = pb.WorldStep(step=ws.step, world_size=ws.world_size)
            try:
                for rank, holder in sorted(ws.ranks.items()):
                    out.ranks.append(pb.OldRank(rank=rank, node=holder.node, source=holder.source,
                                                manifest_json=catalog.manifest(holder, rank, ws.step)))
            except FtdError as exc:
                log.warning("step %d of world %d is not offered for resharding: %s", ws.step, ws.world_size, exc)
                continue
            reply.steps.append(out)
        return reply

    def ReadRanges(self, request: pb.ReadRangesRequest, context: grpc.ServicerContext) -> pb.ReadRangesReply:
        """Byte ranges of a peer's sealed segment, for a reshard (the rank verifies them)."""
        return self._call(context, lambda: self._read_ranges(request))

    def _read_ranges(self, request: pb.ReadRangesRequest) -> pb.ReadRangesReply:
        if request.job != self.config.job:
            raise RequestRejected(f"this daemon serves job {self.config.job!r}, not {request.job!r}")
        total = sum(r.length for r in request.ranges)
        if total > MAX_READ_RANGES_BYTES or len(request.ranges) > MAX_RANGES:
            raise RequestRejected(f"{len(request.ranges)} ranges of {total} bytes: at most {MAX_RANGES} ranges of "
                                  f"{MAX_READ_RANGES_BYTES} bytes per call")
        if request.node < 0:
            raise BadArgument("a segment held here is mapped through Open, not read through ReadRanges")
        view = self.redundancy.group_view()
        if view is None:
            raise NotFound("this node has no peers")
        parts = [view.peer_read(request.node, request.job, request.rank, request.step, r.offset, r.length)
                 for r in request.ranges]
        return pb.ReadRangesReply(data=b"".join(parts))

    def Discard(self, request: pb.DiscardRequest, context: grpc.ServicerContext) -> pb.DiscardReply:
        if request.rank == -1 and request.above_step == -1:  # `ftd rm`: the whole job
            pairs = self._call(context, lambda: self.store.discard_all(request.job))
            return pb.DiscardReply(dropped=[step for _, step in pairs])
        dropped = self._call(context, lambda: self.store.discard(request.job, request.rank, request.above_step))
        if dropped:
            log.info("rank %d: discarded steps %s above %d", request.rank, dropped, request.above_step)
        return pb.DiscardReply(dropped=dropped)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        import psutil

        ranks = [pb.RankStatus(rank=r.rank, sealed_steps=r.sealed_steps, held_bytes=r.held_bytes, writing=r.writing)
                 for r in self.store.summary()]
        reply = pb.StatusReply(job=self.config.job, node=self.config.node, shm_dir=self.config.shm_dir,
                               held_bytes=self.store.held_bytes(), budget_bytes=self.config.memory_budget,
                               available_bytes=psutil.virtual_memory().available, ranks=ranks, version=__version__,
                               protected_step=-1, node_index=-1)
        with self._reshards_lock:
            reply.reshards.extend(self._reshards[r] for r in sorted(self._reshards))
        if self.durable is not None:
            reply.durable_dir, reply.durable_step = str(self.durable.root), self.durable.durable_step
        else:
            reply.durable_step = -1
        status = self.redundancy.status()
        if status is not None:
            reply.node_index, reply.ec = status.node_index, status.scheme
            reply.group.extend(status.group)
            reply.protected_step, reply.rebuilding = status.protected_step, status.rebuilding
            for peer in status.peers:
                reply.peers.append(pb.PeerStatus(node=peer.node, endpoint=peer.endpoint, up=peer.up,
                                                 protected_step=peer.protected_step, rebuilding=peer.rebuilding,
                                                 seconds_since_heartbeat=peer.seconds_since_heartbeat,
                                                 ranks=peer.ranks, steps=peer.steps,
                                                 parity_chunks=peer.parity_chunks))
        return reply

    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> pb.ExportReply:
        """Write this node's ranks of a held step to `<dir>/<job>/step-N` (`ftd export`); commit it when complete.

        Runs in the RPC thread: the call's end (its deadline, a cancelled client, the daemon stopping)
        stops the write between chunks, and its temporary files are removed.
        """
        stop = threading.Event()
        if not context.add_callback(stop.set):  # the call has already ended
            stop.set()
        return self._call(context, lambda: self._export(request.job, request.step, request.dir, stop))

    def _export(self, job: str, step: int, directory: str, stop: threading.Event) -> pb.ExportReply:
        if job != self.config.job:
            raise RequestRejected(f"this daemon serves job {self.config.job!r}, not {job!r}")
        if step < 0:
            raise BadArgument(f"step must be at least 0, not {step}")
        target = _export_directory(directory)
        owner = f"export-{uuid.uuid4().hex[:12]}"
        self.store.pin({step}, owner=owner)  # retention keeps the step while it is written
        try:
            parts = self._export_parts(step)
            return self._export_parts_to(target, job, step, parts, stop, owner)
        finally:
            self.store.pin(set(), owner=owner)

    def _export_parts(self, step: int) -> list[tuple[int, str, int, bytes]]:
        """Every local rank's sealed segment of `step`; NotFound / RequestRejected saying what is missing."""
        parts = self.store.complete_steps().get(step)
        if parts:
            return sorted(parts)
        summary = self.store.summary()
        holders = sorted(r.rank for r in summary if step in r.sealed_steps)
        held = sorted({s for r in summary for s in r.sealed_steps})
        if not holders:
            raise NotFound(f"step {step} is not held on node {self.config.node} (sealed steps held: "
                           f"{held or 'none'}); `ftd status` lists what each rank holds")
        lacking = sorted(r.rank for r in summary if step not in r.sealed_steps)
        raise RequestRejected(f"step {step} is sealed by ranks {holders} but not by ranks {lacking} of node "
                              f"{self.config.node}: only a step every local rank holds can be exported")

    def _export_parts_to(self, target: Path, job: str, step: int, parts: list[tuple[int, str, int, bytes]],
                         stop: threading.Event, owner: str) -> pb.ExportReply:
        path = layout.step_dir(target, job, step)
        ranks = [rank for rank, _, _, _ in parts]
        t0 = time.monotonic()
        try:
            for directory in (path.parent, path):
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o750)
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    raise RequestRejected(f"{directory} is not a directory (a symlink is never followed)")
            if (path / layout.COMMIT).exists():
                world = _already_exported(path, parts)
                if world:
                    log.info("export: step %d is already committed in %s with these snapshots", step, path)
                    return pb.ExportReply(ranks=ranks, bytes=0, committed=True, path=str(path), world_size=world,
                                          already_committed=True)
                raise RequestRejected(f"{path} already holds a committed step {step} of other snapshots (another "
                                      "run, or an older timeline): remove it, or export to another directory")
            tag = f"{self.config.node.replace('/', '_')}-{os.getpid()}-{owner}"
            throttle = writer.Throttle(0, stop)
            world, nbytes = -1, 0
            for _, segment, _, manifest_json in parts:
                record = writer.write_rank(path, segment, manifest_json, throttle, tag)
                world = record.world_size
                nbytes += record.tensors_bytes + record.raw_bytes
            committed = writer.try_commit(path, world, tag)
        except writer.Stopped:
            log.warning("export of step %d to %s stopped: the call ended (deadline, cancelled, or the daemon "
                        "stopping) before it was written", step, path)
            self.store.metrics.durable_steps.labels("export_failed").inc()
            _remove_if_empty(path)
            raise RequestRejected(f"export of step {step} stopped before it was written: the call ended") from None
        except (OSError, writer.DurableError) as exc:
            world = _already_exported(path, parts) if (path / layout.COMMIT).exists() else 0
            if world:  # another writer of these very snapshots (the cadence) committed the step meanwhile
                log.info("export: step %d was committed in %s meanwhile by another writer (%s)", step, path, exc)
                return pb.ExportReply(ranks=ranks, bytes=0, committed=True, path=str(path), world_size=world,
                                      already_committed=True)
            log.warning("export of step %d to %s failed: %s", step, path, exc)
            self.store.metrics.durable_steps.labels("export_failed").inc()
            _remove_if_empty(path)
            raise RequestRejected(f"cannot export step {step} to {path}: {exc}") from None
        missing = [] if committed else [r for r in range(world) if not (path / layout.sidecar_file(r)).exists()]
        seconds = time.monotonic() - t0
        self.store.metrics.durable_bytes.inc(nbytes)
        self.store.metrics.durable_steps.labels("exported").inc()
        log.info("export: wrote ranks %s of step %d to %s (%.1f MB in %.2f s); %s", ranks, step, path, nbytes / 1e6,
                 seconds, "committed" if committed else f"waiting for ranks {missing} (their nodes export them)")
        return pb.ExportReply(ranks=ranks, bytes=nbytes, committed=committed, path=str(path), world_size=world,
                              missing_ranks=missing)


def _export_directory(directory: str) -> Path:
    """The target of an export: an absolute path to an existing directory, not a symlink."""
    if not directory or not os.path.isabs(directory):
        raise BadArgument(f"the export directory must be an absolute path, not {directory!r}")
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise RequestRejected(f"export directory {directory}: {exc.strerror}; create it first") from None
    if stat.S_ISLNK(st.st_mode):
        raise RequestRejected(f"export directory {directory} is a symlink: give the directory it points to")
    if not stat.S_ISDIR(st.st_mode):
        raise RequestRejected(f"export directory {directory} is not a directory")
    return Path(directory)


def _remove_if_empty(path: Path) -> None:
    """Remove a step directory an export created and left empty (nothing else is ever removed)."""
    with contextlib.suppress(OSError):
        path.rmdir()


def _already_exported(path: Path, parts: list[tuple[int, str, int, bytes]]) -> int:
    """The world size of the committed step at `path` when every local rank's sidecar there holds the very
    manifest this node holds; 0 otherwise."""
    world = 0
    for rank, _, _, manifest_json in parts:
        try:
            record = RankRecord.from_bytes((path / layout.sidecar_file(rank)).read_bytes(), str(path))
        except (OSError, ManifestError):
            return 0
        if record.manifest_json != manifest_json:
            return 0
        world = record.world_size
    return world


def _lock_directory(root: Path) -> int:
    """Hold an exclusive flock on `<root>/daemon.lock` for the daemon's lifetime (freed even on SIGKILL).

    Two daemons adopting and evicting the same segments would destroy each other's snapshots.
    """
    fd = os.open(root / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise FtdError(f"another daemon already serves {root} (it holds {root / 'daemon.lock'})") from None
    return fd


class Daemon:
    """The snapshot manager: store + gRPC server + metrics. A context manager."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.metrics = DaemonMetrics()
        self.store = SegmentStore(config, self.metrics)
        self._server: grpc.Server | None = None
        self._lock_fd: int | None = None
        self.redundancy: Redundancy | None = None
        self.durable: Persister | None = None
        self._stopped = threading.Event()

    def start(self) -> Daemon:
        """Lock the job, check the socket path, bind metrics, adopt, serve; on any failure undo what was done."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Daemon:
        self._lock_fd = _lock_directory(self.store.prepare_root())
        unixsock.prepare_socket(self.config.socket, self.config.shm_group, not self.config.socket_dir_private)
        self.metrics.serve(self.config.metrics_port, self.config.metrics_address)
        adopted, dropped = self.store.adopt(retain=not self.config.peer_list)  # with peers: after pinning
        log.info("job %r on node %s: shm %s, re-adopted %d sealed segment(s), dropped %d half-written",
                 self.config.job, self.config.node, self.store.root, adopted, dropped)
        self.redundancy = self._start_redundancy()
        if self.config.durable_dir:
            self.durable = Persister(self.config, self.store, self.metrics).start()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="ftd-rpc"),
                             options=GRPC_OPTIONS)
        pb_grpc.add_SnapshotServicer_to_server(SnapshotServicer(self.config, self.store, self.redundancy,
                                                                self.durable), server)
        unixsock.bind(server, self.config.socket, self.config.shm_group)
        server.start()
        self._server = server
        log.info("serving snapshots on unix:%s (keep %d, budget %s, reserve %d bytes)", self.config.socket,
                 self.config.keep, self.config.memory_budget or "none", self.config.memory_reserve)
        return self

    def _start_redundancy(self) -> Redundancy:
        """Erasure coding across peers when FTD_PEERS is set; no redundancy otherwise."""
        membership = Membership.from_config(self.config)
        if membership is None:
            log.info("no peers configured: snapshots are not erasure-coded across nodes")
            return NoRedundancy()
        group = membership.group
        codec = make_codec(self.config.codec, group.k, group.m)
        return ErasureCoding(self.config, membership, self.store, codec, self.metrics).start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def stop(self, grace: float = 2.0) -> None:
        if self.durable is not None:
            self.durable.stop()
            self.durable = None
        if self.redundancy is not None:
            self.redundancy.stop()
            self.redundancy = None
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
            log.info("daemon stopped")
        self.metrics.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._stopped.set()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

