"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp or /dev/shm that every user can reach."""
    path = Path(tempfile.mkdtemp(prefix="ftd-shared-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)
