"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon


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
