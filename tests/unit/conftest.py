"""Fixtures shared by the unit tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from tests.unit.ecnodes import Cluster


@pytest.fixture
def socket_path(tmp_path, request) -> Iterator[str]:
    """A real daemon in this process for the test module's JOB; yields its unix socket."""
    config = DaemonConfig.load(environ={}, job=request.module.JOB, socket=str(tmp_path / "s.sock"),
                               shm_dir=str(tmp_path / "shm"), memory_reserve="0")
    daemon = Daemon(config).start()
    try:
        yield config.socket
    finally:
        daemon.stop(grace=0.5)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs mounted at tmp_path/shm (the shm directory of storekit._store); skipped where mount is refused."""
    mount = tmp_path / "shm"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=1777", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def cluster_of(tmp_path):
    """`cluster_of(n, "k+m")`: n EC nodes in this process (tests/unit/ecnodes.py), stopped after the test."""
    made: list[Cluster] = []

    def make(n: int, ec: str, **settings: object) -> Cluster:
        cluster = Cluster(tmp_path, n, ec, **settings).start_all()
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
