"""`ftd ls` and `ftd rm`: what the shm directory holds per job, and discarding one job's snapshots.

Both work from the files (`<shm_dir>/ftd-<job>/rank-<r>/<id>.seg` + `.manifest.json`), with or
without a daemon. A live daemon is the one holding the job directory's `daemon.lock` (an flock:
freed when the daemon dies, even by SIGKILL); `ftd rm` asks a live daemon to discard through its
socket, so its accounting stays right, and deletes the directory itself only when none runs.
Nothing is followed through a symlink, and another user's job directory is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ftd.errors import FtdError, ManifestError
from ftd.manifest import Manifest

JOB_PREFIX = "ftd-"
MAX_MANIFEST_BYTES = 64 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass
class JobHoldings:
    """What one job directory holds."""

    job: str
    path: str
    owner_uid: int
    daemon_live: bool
    ranks: dict[int, list[int]] = field(default_factory=dict)  # rank -> sealed steps
    runs: set[str] = field(default_factory=set)
    segment_bytes: int = 0
    newest_seal: float = 0.0  # seconds since the epoch
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"job": self.job, "path": self.path, "owner_uid": self.owner_uid, "daemon_live": self.daemon_live,
                "ranks": {str(r): s for r, s in sorted(self.ranks.items())}, "runs": sorted(self.runs),
                "segment_bytes": self.segment_bytes, "newest_seal": self.newest_seal, "problems": self.problems}


def daemon_live(job_dir: Path) -> bool:
    """True when a daemon holds `<job_dir>/daemon.lock` (probed with a non-blocking shared flock)."""
    try:
        fd = os.open(job_dir / "daemon.lock", os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> Manifest:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path.name}: not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
        return Manifest.from_json(os.read(fd, MAX_MANIFEST_BYTES + 1))
    finally:
        os.close(fd)


def scan_job(job_dir: Path) -> JobHoldings:
    """The sealed steps, runs and bytes under one job directory (problems noted, never raised)."""
    st = os.lstat(job_dir)
    held = JobHoldings(job_dir.name.removeprefix(JOB_PREFIX), str(job_dir), st.st_uid, daemon_live(job_dir))
    try:
        rank_dirs = sorted(os.listdir(job_dir))
    except OSError as exc:
        held.problems.append(f"cannot list: {exc.strerror}")
        return held
    for name in rank_dirs:
        rank_dir = job_dir / name
        if not name.startswith("rank-") or not stat.S_ISDIR(os.lstat(rank_dir).st_mode):
            continue
        try:
            rank = int(name.removeprefix("rank-"))
            entries = sorted(os.listdir(rank_dir))
        except (ValueError, OSError) as exc:
            held.problems.append(f"{name}: {exc}")
            continue
        steps: list[int] = []
        for entry in entries:
            path = rank_dir / entry
            if entry.endswith(".seg"):
                seg = os.lstat(path)
                if stat.S_ISREG(seg.st_mode):
                    held.segment_bytes += seg.st_blocks * 512  # pages actually held, not the sparse size
            elif entry.endswith(".manifest.json"):
                try:
                    manifest = _read_manifest(path)
                except (OSError, FtdError, ValueError) as exc:
                    held.problems.append(f"{name}/{entry}: {exc}")
                    continue
                steps.append(manifest.step)
                held.runs.add(manifest.run)
                held.newest_seal = max(held.newest_seal, manifest.created_at)
        held.ranks[rank] = sorted(steps)
    return held


def scan(shm_dir: str) -> list[JobHoldings]:
    """Every `ftd-<job>` directory under `shm_dir` (symlinks and non-directories left out)."""
    try:
        names = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = Path(shm_dir) / name
        try:
            if name.startswith(JOB_PREFIX) and stat.S_ISDIR(os.lstat(path).st_mode):
                found.append(scan_job(path))
        except OSError:
            continue
    return found


def remove_job_files(job_dir: Path) -> int:
    """Delete an idle job directory of ours; returns the bytes given back. FtdError when it is not ours or live."""
    st = os.lstat(job_dir)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise FtdError(f"{job_dir} is not a directory (a symlink is never followed); remove it by hand")
    if st.st_uid != os.geteuid():
        raise FtdError(f"{job_dir} belongs to uid {st.st_uid}: ftd rm removes only the caller's own job directories")
    if daemon_live(job_dir):
        raise FtdError(f"a daemon serves {job_dir}: discard through it (ftd rm with its --socket)")
    freed = scan_job(job_dir).segment_bytes
    shutil.rmtree(job_dir)  # fd-based on Linux: never follows a symlink inside the tree
    return freed
