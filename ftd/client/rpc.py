"""Trainer -> local daemon calls over the unix socket; grpc errors become ftd errors here.

Before its first call (and again after the daemon was unreachable) the client checks whom it
talks to: the socket's directories must be safe from other users (ftd.socktrust) and the process
listening on it must run as this trainer's uid, root, or FTD_DAEMON_USER (SO_PEERCRED). Anything
else is UntrustedDaemon, a DaemonUnavailable: nothing is sent to it.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

import grpc

from ftd._proto import snapshot_pb2 as pb
from ftd._proto import snapshot_pb2_grpc as pb_grpc
from ftd.config import user_uid
from ftd.errors import DaemonUnavailable, FtdError, NotFound, OutOfMemory, RequestRejected, UntrustedDaemon
from ftd.socktrust import chain_problem, peer_credentials, socket_problem

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    # A restarted daemon must be found again within about a second, not after grpc's 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def translate(exc: grpc.RpcError) -> FtdError:
    """Map a grpc error onto the ftd exception tree."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return DaemonUnavailable(f"daemon unreachable ({code.name}): {detail}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OutOfMemory(detail)
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(detail)
    return RequestRejected(f"{code.name if code else 'error'}: {detail}")


_TRUST_FIX = ("remove whatever is there and start `ftd daemon` with a socket in a directory only its user can "
              "change (the default), or set FTD_SOCKET to the daemon's real socket")


def verify_daemon(path: str, trusted: Collection[int], timeout: float, check_dirs: bool = True) -> int:
    """The uid of the daemon listening on `path`, after checking the path and the peer (SO_PEERCRED).
    `verify_peer` gives its pid too.

    DaemonUnavailable when nothing listens there (yet); UntrustedDaemon when the directories or
    the socket could have been planted by another user, or the listener runs as an untrusted uid.
    `check_dirs=False` (FTD_SOCKET_DIR_PRIVATE) skips the directories above the socket.
    """
    return verify_peer(path, trusted, timeout, check_dirs)[0]


def verify_peer(path: str, trusted: Collection[int], timeout: float, check_dirs: bool = True) -> tuple[int, int]:
    """(uid, pid) of the daemon listening on `path`, checked as `verify_daemon` says."""
    if not os.path.lexists(path):
        raise DaemonUnavailable(f"no daemon socket at {path} (is `ftd daemon` running with this FTD_JOB/FTD_SOCKET?)")
    try:
        problem = ((chain_problem(os.path.dirname(os.path.abspath(path)), trusted) if check_dirs else None)
                   or socket_problem(path, trusted))
    except FileNotFoundError:
        raise DaemonUnavailable(f"the daemon socket {path} went away") from None
    if problem:
        raise UntrustedDaemon(f"refusing the daemon socket {path}: {problem}; {_TRUST_FIX}")
    try:
        peer = peer_credentials(path, timeout)
    except OSError as exc:
        raise DaemonUnavailable(f"daemon unreachable at {path}: {exc.strerror or exc}") from None
    if peer.uid not in trusted:
        raise UntrustedDaemon(f"refusing the process behind {path}: pid {peer.pid} runs as uid {peer.uid}, not as "
                              f"this trainer's uid {os.geteuid()} or root; set FTD_DAEMON_USER to that user if it is "
                              f"your daemon, else {_TRUST_FIX}")
    return peer.uid, peer.pid


@dataclass(frozen=True)
class SegmentTrust:
    """What a segment file must satisfy before a trainer maps it: one of `uids` owns it, it lies under `root`."""

    uids: frozenset[int]
    root: str


class DaemonClient:
    """A rank's connection to its node's daemon. Every call takes the configured timeout.

    `daemon_uid` is the uid of the verified daemon (None until the first call has checked it).
    """

    def __init__(self, socket_path: str, job: str, rank: int, timeout: float, daemon_user: str = "",
                 socket_dir_private: bool = False):
        self.socket_path = socket_path
        self.job, self.rank, self.timeout = job, rank, timeout
        extra = user_uid(daemon_user)
        self.trusted_uids = frozenset({os.geteuid(), 0} | ({extra} if extra is not None else set()))
        self.daemon_uid: int | None = None
        self._check_dirs = not socket_dir_private
        self._shm_dir: str | None = None
        self._watch = ProcessWatch()
        self._channel = grpc.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SnapshotStub(self._channel)

    def verify(self) -> int:
        """Check the socket and the daemon behind it (verify_daemon); remember and return its uid."""
        uid, pid = verify_peer(self.socket_path, self.trusted_uids, self.timeout, self._check_dirs)
        self._watch.follow(pid)
        self.daemon_uid = uid
        return uid

    def same_daemon(self) -> bool:
        """The daemon process verified last still runs (its pidfd has not signalled an exit). False when
        none was verified or this host cannot tell (no pidfd): whatever it leased may be gone. When it has
        exited, whoever answers next is verified again (the channel reconnects on its own)."""
        if self.daemon_uid is None:
            return False
        if self._watch.alive():
            return True
        if self._watch.watching:
            self.daemon_uid, self._shm_dir = None, None
        return False

    def _rpc(self, fn: Callable[..., T], request: object, timeout: float | None = None) -> T:
        if self.daemon_uid is None:
            self.verify()
        try:
            return fn(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            error = translate(exc)
            if isinstance(error, DaemonUnavailable):  # whoever answers next is checked again
                self.daemon_uid, self._shm_dir = None, None
            raise error from None

    def segment_trust(self) -> SegmentTrust:
        """The owner and directory every segment of this daemon must have (asks for shm_dir once if needed)."""
        if self._shm_dir is None:
            self._shm_dir = self.status().shm_dir
        uids = frozenset({self.daemon_uid}) if self.daemon_uid is not None else frozenset({os.geteuid(), 0})
        return SegmentTrust(uids, os.path.join(self._shm_dir, f"ftd-{self.job}"))

    def hello(self, world_size: int, expected_bytes: int = 0, segments: int = 0) -> pb.HelloReply:
        """Introduce this rank. With `expected_bytes` the daemon prepares one more of the rank's segments at
        that size before it replies and lists them (the deadline allows `segments` pre-faults, as Begin's)."""
        reply = self._rpc(self._stub.Hello, pb.HelloRequest(job=self.job, rank=self.rank, world_size=world_size,
                                                            pid=os.getpid(), expected_bytes=expected_bytes),
                          self.timeout + segments * expected_bytes / 200e6)
        self._shm_dir = reply.shm_dir
        return reply

    def begin(self, step: int, nbytes: int) -> pb.BeginReply:
        """Reserve a segment. A first Begin may allocate and pre-fault it, so its deadline grows with the
        size (at 200 MB/s, far below what tmpfs does); it runs on the copy thread, never the training thread."""
        return self._rpc(self._stub.Begin, pb.BeginRequest(job=self.job, rank=self.rank, step=step, nbytes=nbytes),
                         self.timeout + nbytes / 200e6)

    def commit(self, step: int, lease: int, manifest_json: bytes, copy_seconds: float,
               stall_seconds: float) -> list[int]:
        return list(self.commit_leasing(step, lease, manifest_json, copy_seconds, stall_seconds).held_steps)

    def commit_leasing(self, step: int, lease: int, manifest_json: bytes, copy_seconds: float,
                       stall_seconds: float, next_nbytes: int = 0) -> pb.CommitReply:
        """Commit; with `next_nbytes` the reply may lease the segment of the rank's next snapshot (next_lease,
        next_path, next_capacity; lease 0: none, and a daemon that predates this leases none)."""
        return self._rpc(self._stub.Commit, pb.CommitRequest(
            job=self.job, rank=self.rank, step=step, lease=lease, manifest_json=manifest_json,
            copy_seconds=copy_seconds, stall_seconds=stall_seconds, next_nbytes=next_nbytes))

    def abort(self, step: int, lease: int, reason: str) -> None:
        self._rpc(self._stub.Abort, pb.AbortRequest(job=self.job, rank=self.rank, step=step, lease=lease,
                                                    reason=reason))

    def list_steps(self, rank: int | None = None, timeout: float | None = None, world_size: int = 0) -> list[int]:
        """Sealed steps of a rank; waits (up to `timeout`) while the daemon rebuilds from its peers.
        With `world_size`, durable steps of another world size are left out."""
        reply = self._rpc(self._stub.List, pb.ListRequest(job=self.job, rank=self.rank if rank is None else rank,
                                                          world_size=world_size), timeout)
        return list(reply.steps)

    def open(self, step: int, rank: int | None = None, timeout: float | None = None,
             world_size: int = 0) -> pb.OpenReply:
        """A sealed step; the daemon may first fetch it from a peer, hence the separate timeout. With
        `world_size`, a peer's copy of another world size is not fetched."""
        return self._rpc(self._stub.Open, pb.OpenRequest(job=self.job, rank=self.rank if rank is None else rank,
                                                         step=step, world_size=world_size), timeout)

    def worlds(self, world_size: int, decode: bool, timeout: float | None = None) -> pb.WorldsReply:
        """The steps of other world sizes the job holds whole, newest first (a lost member decoded with `decode`)."""
        return self._rpc(self._stub.Worlds, pb.WorldsRequest(job=self.job, world_size=world_size, decode=decode),
                         timeout)

    def read_ranges(self, rank: int, step: int, node: int, ranges: list[tuple[int, int]],
                    timeout: float | None = None) -> bytes:
        """Byte ranges (offset, length) of (rank, step) held by group peer `node`, one after the other."""
        request = pb.ReadRangesRequest(job=self.job, rank=rank, step=step, node=node,
                                       ranges=[pb.ByteRange(offset=o, length=n) for o, n in ranges])
        return self._rpc(self._stub.ReadRanges, request, timeout).data

    def discard(self, above_step: int) -> list[int]:
        reply = self._rpc(self._stub.Discard, pb.DiscardRequest(job=self.job, rank=self.rank, above_step=above_step))
        return list(reply.dropped)

    def recovered(self, step: int, seconds: float, nbytes: int, source: str, **reshard: int) -> None:
        """Report a completed restore; `reshard` holds RecoveredRequest's reshard fields (old_world_size, ...)."""
        self._rpc(self._stub.Recovered, pb.RecoveredRequest(job=self.job, rank=self.rank, step=step, seconds=seconds,
                                                            bytes=nbytes, source=source, **reshard))

    def status(self, timeout: float | None = None) -> pb.StatusReply:
        return self._rpc(self._stub.Status, pb.StatusRequest(), timeout)

    def export(self, step: int, directory: str, timeout: float) -> pb.ExportReply:
        """Have the daemon write its ranks of a held step to `directory` (`ftd export`); it runs until `timeout`."""
        return self._rpc(self._stub.Export, pb.ExportRequest(job=self.job, step=step, dir=directory), timeout)

    def close(self) -> None:
        self._channel.close()
        self._watch.follow(None)


class ProcessWatch:
    """Whether one process (the daemon) still runs, through a pidfd: no pid reuse can fool it."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._poll: select.poll | None = None

    def follow(self, pid: int | None) -> None:
        """Watch `pid` from now on (None: nothing). Where pidfds are missing, `alive` stays False."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._poll = None
        if pid is None or not hasattr(os, "pidfd_open"):
            return
        try:
            self._fd = os.pidfd_open(pid)
        except OSError:  # gone already, or no pidfd on this kernel
            return
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    @property
    def watching(self) -> bool:
        return self._poll is not None

    def alive(self) -> bool:
        """The watched process has not exited (a pidfd turns readable when it does)."""
        return self._poll is not None and not self._poll.poll(0)

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except (OSError, TypeError):  # closed already, or the interpreter is shutting down
                pass
