"""ftd: in-memory fault tolerance for training jobs.

Ranks snapshot their state asynchronously into the node daemon's shared memory and resume from
it bit for bit after a crash.
"""

__version__ = "0.1.0"

from ftd.client.snapshotter import Snapshotter, SnapshotStats  # noqa: E402
from ftd.errors import (  # noqa: E402
    ConfigError,
    DaemonUnavailable,
    FtdError,
    ManifestError,
    OutOfMemory,
    RestoreError,
    SnapshotCorrupt,
)

__all__ = [
    "Snapshotter",
    "SnapshotStats",
    "FtdError",
    "ConfigError",
    "DaemonUnavailable",
    "OutOfMemory",
    "SnapshotCorrupt",
    "ManifestError",
    "RestoreError",
    "__version__",
]
