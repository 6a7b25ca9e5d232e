"""Who can stand behind a unix socket path: StrictModes-style checks of its directories, and SO_PEERCRED.

A socket is only as trustworthy as the directories above it: whoever can write into one of them
(without the sticky bit) can rename it away and put their own socket, or a symlink, in its place.
Both the daemon (before it binds) and the trainer (before it sends anything) run these checks.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCred:
    """The process at the other end of a unix socket, as the kernel saw it at connect/listen time."""

    pid: int
    uid: int
    gid: int


def mode_problem(path: str, st: os.stat_result, trusted: Collection[int]) -> str | None:
    """Why the directory `path` (lstat `st`) could be changed by an untrusted user; None when it cannot."""
    if st.st_uid not in trusted:
        return f"{path} is owned by uid {st.st_uid}, not by {_names(trusted)}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):o}: writable by group or others without the sticky bit"
    return None


def _walk(path: str, trusted: Collection[int], follow: bool) -> str | None:
    """Check every component of absolute `path` from / down; symlinks only when `follow` (their owner counts)."""
    parts = Path(path).parts
    for i in range(len(parts)):
        current = str(Path(*parts[:i + 1]))
        try:
            st = os.lstat(current)
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                return f"{current} is a symlink"
            if st.st_uid not in trusted:
                return f"{current} is a symlink owned by uid {st.st_uid}, not by {_names(trusted)}"
            continue
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        problem = mode_problem(current, st, trusted)
        if problem:
            return problem
    return None


def chain_problem(directory: str, trusted: Collection[int]) -> str | None:
    """Why `directory` or one above it could be changed by a user outside `trusted`; None when none can.

    Every directory from / down must be owned by a trusted uid and not be writable by group or
    others unless it has the sticky bit (like /tmp). A symlink on the way must be owned by a
    trusted uid, and the directories of its resolved path are checked the same way.
    """
    path = os.path.abspath(directory)
    problem = _walk(path, trusted, follow=True)
    real = os.path.realpath(path)
    if problem is None and real != path:
        problem = _walk(real, trusted, follow=False)
    return problem


def socket_problem(path: str, trusted: Collection[int]) -> str | None:
    """Why the socket file `path` itself is not trustworthy (a symlink, not a socket, a foreign owner)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if st.st_uid not in trusted:
        return f"{path} is owned by uid {st.st_uid}, not by {_names(trusted)}"
    return None


def peer_credentials(path: str, timeout: float) -> PeerCred:
    """Connect to the unix socket `path` and read who listens on it (SO_PEERCRED). OSError when nobody does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def _names(uids: Collection[int]) -> str:
    return "uid " + " or ".join(str(u) for u in sorted(set(uids)))
