"""Whom a trainer talks to and what it maps: socket directory chains, SO_PEERCRED, segment files, metrics binds."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from ftd.client.rpc import DaemonClient, SegmentTrust, verify_daemon
from ftd.client.segments import MappedSegment
from ftd.config import ClientConfig
from ftd.daemon import unixsock
from ftd.errors import ConfigError, DaemonUnavailable, FtdError, UntrustedDaemon, UntrustedSegment
from ftd.metrics import DaemonMetrics
from ftd.socktrust import chain_problem
from tests.unixusers import SECOND_USER, fork_as, listen, second_user, stop

ME = os.geteuid()


# ---- directory chains ------------------------------------------------------------------------


def test_a_private_chain_is_trusted(tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True, mode=0o700)
    assert chain_problem(str(deep), {0, ME}) is None


def test_a_directory_writable_by_others_is_refused_unless_sticky(tmp_path):
    loose = tmp_path / "loose"
    (loose / "below").mkdir(parents=True)
    os.chmod(loose, 0o777)
    assert str(loose) in chain_problem(str(loose / "below"), {0, ME})
    os.chmod(loose, 0o1777)
    assert chain_problem(str(loose / "below"), {0, ME}) is None
    os.chmod(loose, 0o775)  # group-writable is as bad
    assert chain_problem(str(loose), {0, ME}) is not None


def test_a_symlinked_directory_is_checked_where_it_leads(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    (tmp_path / "via").symlink_to(target)
    assert chain_problem(str(tmp_path / "via"), {0, ME}) is not None
    os.chmod(target, 0o700)
    assert chain_problem(str(tmp_path / "via"), {0, ME}) is None


def test_a_directory_of_another_user_is_refused_unless_that_user_is_trusted(shared_dir):
    other = second_user()
    theirs = shared_dir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, other.pw_uid, other.pw_gid)
    assert chain_problem(str(theirs), {0, ME}) is not None
    assert chain_problem(str(theirs), {0, ME, other.pw_uid}) is None


# ---- the socket and the peer -----------------------------------------------------------------


def test_no_socket_is_an_absent_daemon_not_an_untrusted_one(tmp_path):
    with pytest.raises(DaemonUnavailable) as caught:
        verify_daemon(str(tmp_path / "none.sock"), {0, ME}, 1.0)
    assert not isinstance(caught.value, UntrustedDaemon)


def test_a_symlink_or_a_plain_file_is_not_a_daemon_socket(tmp_path):
    proc = listen(tmp_path / "real.sock")
    try:
        (tmp_path / "link.sock").symlink_to(tmp_path / "real.sock")
        (tmp_path / "file.sock").write_bytes(b"")
        for name in ("link.sock", "file.sock"):
            with pytest.raises(UntrustedDaemon):
                verify_daemon(str(tmp_path / name), {0, ME}, 1.0)
        assert verify_daemon(str(tmp_path / "real.sock"), {0, ME}, 1.0) == ME
    finally:
        stop(proc)


def test_a_listener_of_another_uid_is_refused_unless_it_is_the_daemon_user(shared_dir):
    other = second_user()
    path = shared_dir / "squat.sock"
    proc = listen(path, other)
    try:
        with pytest.raises(UntrustedDaemon):  # its socket file is theirs
            verify_daemon(str(path), {0, ME}, 1.0)
        os.chown(path, ME, -1)  # a socket file of ours does not make its listener ours (SO_PEERCRED)
        with pytest.raises(UntrustedDaemon):
            verify_daemon(str(path), {0, ME}, 1.0)
        client = DaemonClient(str(path), "job", 0, 1.0, daemon_user=SECOND_USER)
        try:
            assert client.verify() == other.pw_uid == client.daemon_uid
        finally:
            client.close()
        with pytest.raises(UntrustedDaemon):  # the Snapshot RPCs go through the same check
            DaemonClient(str(path), "job", 0, 1.0).list_steps()
    finally:
        stop(proc)


def test_a_trainer_without_a_daemon_of_its_own_finds_the_root_daemon():
    other = second_user()
    job = f"fallback-{uuid.uuid4().hex[:8]}"
    def shown() -> str:
        pid, out = fork_as(other, lambda fd: os.write(fd, ClientConfig.load(environ={}, job=job).socket.encode()))
        with os.fdopen(out, "rb") as pipe:
            text = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return text

    assert shown() == f"/tmp/ftd-{other.pw_uid}/ftd-{job}.sock"
    os.makedirs("/run/ftd", mode=0o755, exist_ok=True)
    root_socket = Path(f"/run/ftd/ftd-{job}.sock")
    root_socket.write_bytes(b"")
    try:
        assert shown() == str(root_socket)
    finally:
        root_socket.unlink()
    assert ClientConfig.load(environ={}, job=job).socket.endswith(f"/ftd-{job}.sock")


# ---- the daemon's side of the socket ---------------------------------------------------------


def test_the_daemon_refuses_a_socket_directory_others_can_change(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(ConfigError):
        unixsock.prepare_socket(str(loose / "ftd.sock"), -1)
    with pytest.raises(ConfigError):  # an explicit directory is never created
        unixsock.prepare_socket(str(tmp_path / "missing" / "ftd.sock"), -1)


def test_a_private_socket_directory_by_other_means_skips_only_the_directory_check(tmp_path):
    """FTD_SOCKET_DIR_PRIVATE (a pod's emptyDir, mode 0777): the chain is not checked, the listener still is."""
    pod_volume = tmp_path / "run-ftd"
    pod_volume.mkdir()
    os.chmod(pod_volume, 0o777)
    path = pod_volume / "ftd.sock"
    with pytest.raises(ConfigError):
        unixsock.prepare_socket(str(path), -1)
    unixsock.prepare_socket(str(path), -1, check_dirs=False)
    proc = listen(path)
    try:
        with pytest.raises(UntrustedDaemon):
            verify_daemon(str(path), {0, ME}, 1.0)
        assert verify_daemon(str(path), {0, ME}, 1.0, check_dirs=False) == ME
        client = DaemonClient(str(path), "job", 0, 1.0, socket_dir_private=True)
        try:
            assert client.verify() == ME
        finally:
            client.close()
    finally:
        stop(proc)


def test_a_private_socket_directory_still_refuses_a_listener_of_another_uid(shared_dir):
    other = second_user()
    path = shared_dir / "squat-private.sock"
    proc = listen(path, other)
    try:
        os.chown(path, ME, -1)
        with pytest.raises(UntrustedDaemon):
            verify_daemon(str(path), {0, ME}, 1.0, check_dirs=False)
    finally:
        stop(proc)


def test_the_daemon_replaces_only_its_own_dead_socket(shared_dir):
    other = second_user()
    dead = shared_dir / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))
    unixsock.prepare_socket(str(dead), -1)
    assert not dead.exists()
    squat = shared_dir / "squat.sock"
    proc = listen(squat, other)
    try:
        with pytest.raises(ConfigError) as caught:
            unixsock.prepare_socket(str(squat), -1)
        assert f"uid {other.pw_uid}" in str(caught.value)
        assert squat.exists()
    finally:
        stop(proc)
    live = shared_dir / "live.sock"
    proc = listen(live)
    try:
        with pytest.raises(FtdError):
            unixsock.prepare_socket(str(live), -1)
    finally:
        stop(proc)


# ---- segment files ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "shm" / "ftd-job"
    (root / "rank-0").mkdir(parents=True)
    good = root / "rank-0" / "good.seg"
    good.write_bytes(bytes(8192))
    return root, good


def _map(path, trust: SegmentTrust, size: int = 4096) -> None:
    MappedSegment(str(path), size, writable=False, trust=trust).close()


def test_a_plain_segment_of_the_daemon_in_its_tree_is_mapped(tree):
    root, good = tree
    (root / "rank-0" / "sub").mkdir()
    trust = SegmentTrust(frozenset({ME}), str(root))
    _map(good, trust)
    _map(root / "rank-0" / "sub" / ".." / "good.seg", trust)


@pytest.mark.parametrize("kind", ["outside", "dotdot", "symlink", "hardlink", "fifo", "truncated", "owner"])
def test_a_segment_the_daemon_does_not_own_in_its_tree_is_refused(tree, tmp_path, kind):
    root, good = tree
    trust = SegmentTrust(frozenset({ME}), str(root))
    rank = root / "rank-0"
    outside = tmp_path / "outside.seg"
    outside.write_bytes(bytes(8192))
    if kind == "outside":
        path = outside
    elif kind == "dotdot":
        path = rank / ".." / ".." / ".." / "outside.seg"
    elif kind == "symlink":
        path = rank / "link.seg"
        path.symlink_to(good)
    elif kind == "hardlink":
        path = rank / "hard.seg"
        os.link(outside, path)
    elif kind == "fifo":
        path = rank / "fifo.seg"
        os.mkfifo(path)
    elif kind == "owner":
        path, trust = good, SegmentTrust(frozenset({ME + 1}), str(root))
    else:
        path = good
    with pytest.raises(UntrustedSegment):
        _map(path, trust, size=8193 if kind == "truncated" else 4096)


# ---- metrics ---------------------------------------------------------------------------------


def test_a_busy_metrics_port_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = DaemonMetrics()
        with pytest.raises(ConfigError) as caught:
            metrics.serve(port, "127.0.0.1")
        assert "FTD_METRICS_PORT" in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)
        metrics.close()
