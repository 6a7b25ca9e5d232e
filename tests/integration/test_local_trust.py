"""A trainer trusts only its own daemon: real daemons, a second user's squatters, rogue segment paths, metrics."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

import ftd
from ftd.client.rpc import DaemonClient
from ftd.client.segments import SegmentCache
from ftd.config import default_socket, default_socket_dir
from ftd.demo.procs import DaemonProcess, free_port, ftd_env
from ftd.errors import UntrustedDaemon, UntrustedSegment
from tests.unixusers import SECOND_USER, fork_as, listen, second_user, stop

REPO = Path(__file__).resolve().parents[2]
# The daemon as the second user: started by this interpreter's user (the second one may not reach the
# interpreter), it imports what it needs and then drops to that user before it reads any setting.
_AS_USER = ("import os, sys, pwd, concurrent.futures.thread, ftd.cli, ftd.daemon.server, ftd.daemon.peers; "
            "u = pwd.getpwnam(sys.argv[1]); os.setgroups([]); os.setgid(u.pw_gid); os.setuid(u.pw_uid); "
            "sys.exit(ftd.cli.main(['daemon']))")


def _job() -> str:
    return f"trust-{uuid.uuid4().hex[:10]}"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _snapshotter(job: str, socket_path: str, **settings) -> tuple[ftd.Snapshotter, torch.nn.Module]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return ftd.Snapshotter(model, opt, rank=0, world_size=1, job=job, socket=socket_path, rpc_timeout=5,
                           **settings), model




@pytest.fixture
def shm():
    base = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    path = base / f"ftd-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_daemon(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftd", "daemon"], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_default_socket_is_private_and_out_of_reach_of_other_users(tmp_path, shm):
    other = second_user()
    job = _job()
    path = default_socket(job, os.geteuid())

    def squat(out: int) -> None:
        try:
            socket.socket(socket.AF_UNIX).bind(path)
            os.write(out, b"bound")
        except OSError as exc:
            os.write(out, str(exc.errno).encode())

    pid, out = fork_as(other, squat)
    with os.fdopen(out, "rb") as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)
    assert outcome != b"bound", f"a second user could bind {path}"
    daemon = DaemonProcess(ftd_env(tmp_path, job, FTD_SOCKET=path, FTD_SHM_DIR=str(shm)), tmp_path / "d.log").start()
    try:
        directory = os.lstat(default_socket_dir(os.geteuid()))
        sock = os.lstat(path)
        assert directory.st_uid == os.geteuid() == sock.st_uid
        assert stat.S_IMODE(directory.st_mode) == (0o755 if os.geteuid() == 0 else 0o700)
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
        client = DaemonClient(path, job, 0, 5)
        try:
            assert client.list_steps() == [] and client.daemon_uid == os.geteuid()
        finally:
            client.close()
    finally:
        daemon.kill()
        Path(path).unlink(missing_ok=True)


def test_a_squatter_on_a_shared_path_gets_nothing_and_the_daemon_refuses_to_start(tmp_path, shared_dir, shm):
    other = second_user()
    job = _job()
    path = shared_dir / "ftd.sock"
    squatter = listen(path, other)
    try:
        snap, _ = _snapshotter(job, str(path), daemon_wait=60)
        try:
            t0 = time.monotonic()
            assert snap.restore() == 0
            assert time.monotonic() - t0 < 10, "restore waited for an untrusted daemon"
            assert snap.stats.restore_failures
            snap.snapshot(1)
            assert snap.wait(30)
            assert dict(snap.stats.skip_reasons) == {"untrusted_daemon": 1}
        finally:
            snap.close()
        done = _run_daemon(ftd_env(tmp_path, job, FTD_SOCKET=str(path), FTD_SHM_DIR=str(shm)))
        assert done.returncode == 2, done.stderr
        assert os.lstat(path).st_uid == other.pw_uid, "the daemon removed someone else's socket"
    finally:
        stop(squatter)


def test_a_daemon_of_another_user_is_trusted_only_as_the_daemon_user(tmp_path, shm):
    other = second_user()
    job = _job()
    path = default_socket(job, other.pw_uid)
    env = ftd_env(tmp_path, job, FTD_SOCKET=path, FTD_SHM_DIR=str(shm))
    with open(tmp_path / "d.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _AS_USER, SECOND_USER], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "d.log").read_text()
            time.sleep(0.05)
        directory = os.lstat(os.path.dirname(path))
        assert (directory.st_uid, stat.S_IMODE(directory.st_mode)) == (other.pw_uid, 0o700)
        with pytest.raises(UntrustedDaemon):
            DaemonClient(path, job, 0, 5).list_steps()
        snap, _ = _snapshotter(job, path, daemon_user=SECOND_USER)
        try:
            snap.snapshot(1)
            assert snap.wait(30)
            assert snap.stats.sealed == 1, dict(snap.stats.skip_reasons)
            assert snap.client.daemon_uid == other.pw_uid
        finally:
            snap.close()
    finally:
        proc.kill()
        proc.wait(30)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


BAD_SEGMENTS = ["outside", "dotdot", "symlink", "foreign", "hardlink"]


def test_segments_a_daemon_names_outside_its_own_files_are_never_mapped(tmp_path):
    other = second_user()
    job, sock, mode = _job(), tmp_path / "rogue.sock", tmp_path / "mode"
    mode.write_text("good")
    with open(tmp_path / "rogue.log", "wb") as log:
        rogue = subprocess.Popen([sys.executable, "-m", "tests.integration.rogue_daemon", str(sock),
                                  str(tmp_path / "shm"), job, str(mode), str(other.pw_uid)], cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert rogue.poll() is None and time.monotonic() < deadline, (tmp_path / "rogue.log").read_text()
            time.sleep(0.05)
        client = DaemonClient(str(sock), job, 0, 5)
        try:
            for kind in BAD_SEGMENTS:
                mode.write_text(kind)
                lease = client.begin(1, 4096)
                with pytest.raises(UntrustedSegment):
                    SegmentCache().get(lease.path, lease.capacity, client.segment_trust())
        finally:
            client.close()
        mode.write_text("good")
        snap, model = _snapshotter(job, str(sock))
        try:
            snap.snapshot(1)
            assert snap.wait(30) and snap.stats.sealed == 1, dict(snap.stats.skip_reasons)
            mode.write_text("symlink")
            snap.snapshot(2)
            assert snap.wait(30) and snap.stats.skip_reasons["untrusted_segment"] == 1
        finally:
            snap.close()
        for kind in [*BAD_SEGMENTS, "good"]:
            mode.write_text(kind)
            restorer, _ = _snapshotter(job, str(sock))
            try:
                assert restorer.restore() == (1 if kind == "good" else 0), kind
            finally:
                restorer.close()
    finally:
        rogue.kill()
        rogue.wait(30)


def test_a_busy_metrics_port_stops_the_daemon(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = ftd_env(tmp_path, _job(), FTD_METRICS_PORT=str(port), FTD_METRICS_ADDRESS="127.0.0.1")
        done = _run_daemon(env)
    assert done.returncode == 2, done.stderr
    assert not os.path.lexists(env["FTD_SOCKET"]), "a daemon that did not start left its socket behind"


def test_metrics_bind_the_configured_address_only(tmp_path):
    port = free_port()
    env = ftd_env(tmp_path, _job(), FTD_METRICS_PORT=str(port), FTD_METRICS_ADDRESS="127.0.0.2")
    daemon = DaemonProcess(env, tmp_path / "d.log").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10) as reply:
            assert b"ftd_shm_held_bytes" in reply.read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        daemon.kill()
