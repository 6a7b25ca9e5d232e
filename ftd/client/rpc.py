"""Trainer -> local daemon calls over the unix socket; grpc errors become ftd errors here."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import grpc

from ftd._proto import snapshot_pb2 as pb
from ftd._proto import snapshot_pb2_grpc as pb_grpc
from ftd.errors import DaemonUnavailable, FtdError, NotFound, OutOfMemory, RequestRejected

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


class DaemonClient:
    """A rank's connection to its node's daemon. Every call takes the configured timeout."""

    def __init__(self, socket_path: str, job: str, rank: int, timeout: float):
        self.socket_path = socket_path
        self.job, self.rank, self.timeout = job, rank, timeout
        self._channel = grpc.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SnapshotStub(self._channel)

    def _rpc(self, fn: Callable[..., T], request: object, timeout: float | None = None) -> T:
        try:
            return fn(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc) from None

    def hello(self, world_size: int) -> pb.HelloReply:
        return self._rpc(self._stub.Hello, pb.HelloRequest(job=self.job, rank=self.rank, world_size=world_size,
                                                           pid=os.getpid()))

    def begin(self, step: int, nbytes: int) -> pb.BeginReply:
        """Reserve a segment. A first Begin may allocate and pre-fault it, so its deadline grows with the
        size (at 200 MB/s, far below what tmpfs does); it runs on the copy thread, never the training thread."""
        return self._rpc(self._stub.Begin, pb.BeginRequest(job=self.job, rank=self.rank, step=step, nbytes=nbytes),
                         self.timeout + nbytes / 200e6)

    def commit(self, step: int, lease: int, manifest_json: bytes, copy_seconds: float,
               stall_seconds: float) -> list[int]:
        reply = self._rpc(self._stub.Commit, pb.CommitRequest(
            job=self.job, rank=self.rank, step=step, lease=lease, manifest_json=manifest_json,
            copy_seconds=copy_seconds, stall_seconds=stall_seconds))
        return list(reply.held_steps)

    def abort(self, step: int, lease: int, reason: str) -> None:
        self._rpc(self._stub.Abort, pb.AbortRequest(job=self.job, rank=self.rank, step=step, lease=lease,
                                                    reason=reason))

    def list_steps(self, rank: int | None = None, timeout: float | None = None) -> list[int]:
        """Sealed steps of a rank; waits (up to `timeout`) while the daemon rebuilds from its peers."""
        reply = self._rpc(self._stub.List, pb.ListRequest(job=self.job, rank=self.rank if rank is None else rank),
                          timeout)
        return list(reply.steps)

    def open(self, step: int, rank: int | None = None, timeout: float | None = None) -> pb.OpenReply:
        """A sealed step; the daemon may first fetch it from a peer, hence the separate timeout."""
        return self._rpc(self._stub.Open, pb.OpenRequest(job=self.job, rank=self.rank if rank is None else rank,
                                                         step=step), timeout)

    def discard(self, above_step: int) -> list[int]:
        reply = self._rpc(self._stub.Discard, pb.DiscardRequest(job=self.job, rank=self.rank, above_step=above_step))
        return list(reply.dropped)

    def recovered(self, step: int, seconds: float, nbytes: int, source: str) -> None:
        self._rpc(self._stub.Recovered, pb.RecoveredRequest(job=self.job, rank=self.rank, step=step, seconds=seconds,
                                                            bytes=nbytes, source=source))

    def status(self) -> pb.StatusReply:
        return self._rpc(self._stub.Status, pb.StatusRequest())

    def close(self) -> None:
        self._channel.close()
