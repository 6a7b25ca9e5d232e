"""ftd: in-memory fault tolerance for training jobs.

Ranks snapshot their state asynchronously into the node daemon's shared memory and resume from
it bit for bit after a crash.
"""

from ftd._version import __version__

from typing import TYPE_CHECKING, Any  # noqa: E402

from ftd.errors import (  # noqa: E402
    ConfigError,
    DaemonUnavailable,
    FtdError,
    ManifestError,
    MergeError,
    OutOfMemory,
    RestoreError,
    SnapshotCorrupt,
)
from ftd.logs import log_to_stderr  # noqa: E402

if TYPE_CHECKING:
    from ftd.client.snapshotter import Snapshotter, SnapshotStats


def __getattr__(name: str) -> Any:
    # The trainer API needs torch; the daemon does not, so it is imported on first use only.
    if name in ("Snapshotter", "SnapshotStats"):
        from ftd.client import snapshotter

        return getattr(snapshotter, name)
    if name == "merge":  # ftd.merge.merge_steps: checkpoint averaging (needs torch)
        import importlib

        return importlib.import_module("ftd.merge")
    raise AttributeError(f"module 'ftd' has no attribute {name!r}")


__all__ = [
    "Snapshotter",
    "SnapshotStats",
    "FtdError",
    "ConfigError",
    "DaemonUnavailable",
    "OutOfMemory",
    "SnapshotCorrupt",
    "ManifestError",
    "MergeError",
    "RestoreError",
    "log_to_stderr",
    "__version__",
]
