"""The one exception tree of ftd. grpc and OS errors are translated into these where they enter."""

from __future__ import annotations


class FtdError(Exception):
    """Base of every error ftd raises."""


class ConfigError(FtdError):
    """A setting is unknown, malformed or out of range."""


class DaemonUnavailable(FtdError):
    """The local daemon cannot be reached (down, restarting, or its socket is missing)."""


class UntrustedDaemon(DaemonUnavailable):
    """What answers on the socket is not a daemon this trainer trusts (peer uid, or an unsafe socket path)."""


class UntrustedSegment(FtdError):
    """The daemon handed over a segment the trainer refuses to map (outside its tree, a link, a foreign owner)."""


class RequestRejected(FtdError):
    """The daemon understood a request and refused it (wrong job, bad lease, malformed input)."""


class OutOfMemory(RequestRejected):
    """The daemon refused a segment because the memory budget or the host's free memory would be exceeded."""


class NotFound(RequestRejected):
    """The requested (job, rank, step) is not held."""


class SnapshotCorrupt(FtdError):
    """A sealed snapshot failed validation: checksum, bounds, job id, or shape/dtype against the model."""

    def __init__(self, message: str, *, rank: int | None = None, step: int | None = None, entry: str | None = None):
        where = []
        if rank is not None:
            where.append(f"rank {rank}")
        if step is not None:
            where.append(f"step {step}")
        if entry is not None:
            where.append(f"entry {entry!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.rank = rank
        self.step = step
        self.entry = entry


class ManifestError(SnapshotCorrupt):
    """A manifest is malformed or inconsistent with its segment."""


class OtherRun(FtdError):
    """A snapshot was taken by another run of the job (another launch): it is never resumed."""


class RestoreError(FtdError):
    """No consistent step could be restored although snapshots exist."""


class MergeError(FtdError, ValueError):
    """Steps cannot be merged (`ftd merge`): a step not held, steps holding different tensors, a metric missing."""


class CheckFreeError(FtdError, ValueError):
    """A lost pipeline stage cannot be rebuilt from its neighbours (structures differ, no neighbour, bad norm)."""
