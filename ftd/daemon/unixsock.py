"""The daemon's unix socket: a directory only its user controls, no stale or foreign socket, private modes.

The default directory (config.default_socket_dir) is created here: /run/ftd (0755) for a root
daemon, /tmp/ftd-<uid> (0700; 0750 with group shm_group) for any other. An explicit FTD_SOCKET's
directory must exist already. Either way every directory from / down must be safe from other
users (ftd.socktrust), or the daemon does not start: trainers would refuse it anyway. The socket
is 0600, or 0660 with group shm_group when that is set (a root daemon included).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as socketlib
import stat
from collections.abc import Iterator

import grpc

from ftd.config import ROOT_SOCKET_DIR, default_socket_dir
from ftd.errors import ConfigError, FtdError
from ftd.socktrust import chain_problem

log = logging.getLogger(__name__)


def directory_mode(uid: int, shm_group: int) -> int:
    """Mode of the default socket directory of a daemon run by `uid`."""
    if uid == 0:
        return 0o755
    return 0o750 if shm_group >= 0 else 0o700


def socket_mode(shm_group: int) -> int:
    """Mode of the socket file: owner only, or owner and group shm_group."""
    return 0o660 if shm_group >= 0 else 0o600


def prepare_socket(path: str, shm_group: int, check_dirs: bool = True) -> None:
    """Make `path` ready to bind: its directory safe (a default one created), no stale socket left.

    ConfigError when the directory is missing (explicit path), could be changed by another user,
    or `path` is something else than this user's socket; FtdError when a daemon still serves on it.
    """
    uid = os.geteuid()
    directory = os.path.dirname(os.path.abspath(path))
    if directory == default_socket_dir(uid):
        _make_default_dir(directory, uid, shm_group)
    elif not os.path.isdir(directory):
        raise ConfigError(f"the directory of FTD_SOCKET={path} does not exist: create it (writable only by the "
                          f"daemon's user), or leave FTD_SOCKET unset for the default in {default_socket_dir(uid)}")
    problem = chain_problem(directory, {0, uid}) if check_dirs else None
    if problem:
        raise ConfigError(f"refusing to serve on {path}: {problem}, so another user could replace the socket; put "
                          f"FTD_SOCKET in a directory only the daemon's user (or root) can change, or leave it unset "
                          f"for the default in {default_socket_dir(uid)}")
    _clear_stale(path, uid)


def _make_default_dir(directory: str, uid: int, shm_group: int) -> None:
    """Create the default socket directory, or tighten an existing one of this user to its mode."""
    mode = directory_mode(uid, shm_group)
    if directory == ROOT_SOCKET_DIR:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
    try:
        os.mkdir(directory, mode)
        log.info("created the socket directory %s (mode %o)", directory, mode)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} is not a directory (a symlink or a file): remove it and start again")
    if st.st_uid != uid:
        raise ConfigError(f"{directory} is owned by uid {st.st_uid}, not by the daemon's uid {uid}: another user "
                          f"created it, perhaps to plant a socket; remove it and start again, or set FTD_SOCKET")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(directory, mode)
    if uid != 0 and shm_group >= 0 and st.st_gid != shm_group:
        _set_group(directory, shm_group)


def _clear_stale(path: str, uid: int) -> None:
    """Remove a dead daemon's socket of this user; refuse anything else at `path`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket: remove it, or choose another FTD_SOCKET")
    if st.st_uid != uid:
        raise ConfigError(f"{path} is a socket of uid {st.st_uid}, not of the daemon's uid {uid}: another user put "
                          f"it there (perhaps to impersonate the daemon); remove it, or choose another FTD_SOCKET")
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            log.info("removed the stale socket %s of a daemon that is gone", path)
            return
    raise FtdError(f"another daemon is already serving on {path}")


def bind(server: grpc.Server, path: str, shm_group: int) -> None:
    """Bind `server` to unix:`path` with the socket never looser than its final mode; ConfigError when it cannot."""
    why = "the path is taken or not writable"
    with _umask(0o177):
        try:
            bound = server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            bound, why = 0, str(exc)
    if bound == 0:
        raise ConfigError(f"cannot listen on unix:{path} ({why}); choose another FTD_SOCKET, or leave it unset for "
                          f"the default in {default_socket_dir(os.geteuid())}")
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(f"{path} is not the socket this daemon just bound: someone replaced it; choose a safe "
                          f"FTD_SOCKET")
    if shm_group >= 0:
        _set_group(path, shm_group)
    os.chmod(path, socket_mode(shm_group))


def _set_group(path: str, gid: int) -> None:
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise ConfigError(f"cannot give {path} to group {gid} (FTD_SHM_GROUP): {exc}") from None


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
