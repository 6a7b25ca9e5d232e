"""A second unix user for the local-trust tests, and processes that run as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socketserver
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

SECOND_USER = "ftdtest2"


def second_user() -> pwd.struct_passwd:
    """A second unix user (created when missing); skips when this machine cannot have one."""
    try:
        return pwd.getpwnam(SECOND_USER)
    except KeyError:
        pass
    if os.geteuid() != 0:
        pytest.skip("a second unix user is needed and creating one needs root")
    if shutil.which("useradd") is None:
        pytest.skip("a second unix user is needed and useradd is missing")
    done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SECOND_USER],
                          capture_output=True, text=True)
    if done.returncode != 0 and "already exists" not in done.stderr:
        pytest.skip(f"useradd {SECOND_USER} failed: {done.stderr.strip()}")
    return pwd.getpwnam(SECOND_USER)


def drop_to(user: pwd.struct_passwd) -> None:
    """Become `user` in this process (groups, gid, then uid)."""
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def fork_as(user: pwd.struct_passwd | None, target: Callable[[int], None]) -> tuple[int, int]:
    """Run `target(write_fd)` in a forked child that became `user` (no exec: the interpreter may live where the
    second user cannot reach it); return (pid, read_fd) of the pipe it writes to."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(read_fd)
            if user is not None:
                drop_to(user)
            target(write_fd)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def run_as(user: pwd.struct_passwd, action: Callable[[], None]) -> None:
    """Run `action()` in a forked child that became `user`; fail when it fails."""
    pid, read_fd = fork_as(user, lambda _fd: action())
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the action as the second user failed"


class _Quiet(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(1)


def listen(path: Path, user: pwd.struct_passwd | None = None) -> int:
    """A real socketserver bound to `path` by a child process (of `user` when given); its pid once it listens."""
    def serve(ready: int) -> None:
        server = socketserver.UnixStreamServer(str(path), _Quiet)
        os.write(ready, b"r")
        server.serve_forever()

    pid, ready = fork_as(user, serve)
    try:
        assert os.read(ready, 1) == b"r", "the listener did not start"
    finally:
        os.close(ready)
    return pid


def stop(pid: int) -> None:
    """SIGKILL a child started by `listen` or `fork_as` and reap it."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
