"""Parity files and rotation records: private modes, never reached through a symlink, bounded parsing,
and parity counted against the daemon's memory budget."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ftd.daemon.parity import ParityStore, RotationRecord
from ftd.errors import FtdError, OutOfMemory
from tests.unit.storekit import JOB, _store

MiB = 1 << 20


def _record(step: int) -> RotationRecord:
    return RotationRecord(step, 0, "isal", 2, 1, 4096, 4096, [0, 1, 2], [[1, 0], [2, 0]], [0], [[0], [0], [0]])


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_parity_directory_files_and_records_are_private(tmp_path):
    store = ParityStore(tmp_path)
    store.write(3, 0, 0, 4096, 0, bytes(4096))
    store.put_record(_record(3))
    assert _mode(tmp_path / "parity") == 0o700
    assert {p.name: _mode(p) for p in (tmp_path / "parity").iterdir()} == {
        "s3-r0-p0.par": 0o600, "s3-r0.rec.json": 0o600}
    assert store.record(3, 0) == _record(3)


def test_a_symlink_in_place_of_a_parity_file_or_record_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "job").mkdir()
    store = ParityStore(tmp_path / "job")
    (tmp_path / "job" / "parity" / "s1-r0-p0.par").symlink_to(victim)
    (tmp_path / "job" / "parity" / "s1-r0.rec.json").symlink_to(victim)
    with pytest.raises(OSError):
        store.create(1, 0, 0, 4096)
    with pytest.raises(FtdError, match="unusable"):
        store.record(1, 0)
    with pytest.raises(FtdError):
        store.read(1, 0, 0, 0, 4096)
    assert victim.read_bytes() == b"precious"


def test_a_parity_directory_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "parity").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FtdError, match="private directory"):
        ParityStore(tmp_path / "job")


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"step": ' + b"1" * (17 << 20) + b"}", b"\xff\xfe"])
def test_a_hostile_record_is_an_error_not_a_crash(tmp_path, raw):
    store = ParityStore(tmp_path)
    fd = os.open(tmp_path / "parity" / "s2-r0.rec.json", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, raw)
    os.close(fd)
    with pytest.raises(FtdError):
        store.record(2, 0)


def test_parity_held_on_the_node_counts_against_the_segment_budget(tmp_path):
    store = _store(tmp_path, memory_budget=str(4 * MiB))
    parity = ParityStore(store.prepare_root(), mode=store.dir_mode)
    store.count_external(parity.held_bytes)
    store.begin(JOB, 0, 1, 1 * MiB)
    parity.create(7, 0, 0, 2 * MiB)
    with pytest.raises(OutOfMemory, match="parity"):
        store.begin(JOB, 1, 1, 2 * MiB)
    parity.drop_except(set())
    assert store.begin(JOB, 1, 1, 2 * MiB).capacity >= 2 * MiB


def test_only_parity_that_matches_its_record_is_announced(tmp_path):
    """Written here: announced once its record seals it. Found on disk by a restarted daemon:
    checked against its record first; a chunk that rotted is dropped, never announced."""
    from ftd.daemon.parity import stripe_checksums

    good, bad = os.urandom(4096), os.urandom(4096)

    def record(step: int, chunk: bytes) -> RotationRecord:
        return RotationRecord(step, 0, "isal", 2, 1, 4096, 4096, [0, 1, 2], [[1, 0], [2, 0]], [0],
                              [[0], [0], stripe_checksums(chunk, 4096)])

    store = ParityStore(tmp_path)
    for step, chunk in ((4, good), (5, bad)):
        store.write(step, 0, 0, 4096, 0, chunk)
    store.put_record(record(4, good))
    store.put_record(record(5, bad))
    assert store.held() == []  # records on disk, but nothing sealed them in this process
    assert store.seal(4, 0, 0) and store.seal(5, 0, 0)
    assert [h[0] for h in store.held()] == [4, 5]
    store.close()
    with open(tmp_path / "parity" / "s5-r0-p0.par", "r+b") as f:  # step 5's chunk rots while the daemon is down
        f.write(b"\0" * 64)
    restarted = ParityStore(tmp_path)
    assert [h[0] for h in restarted.held()] == [4]
    assert not (tmp_path / "parity" / "s5-r0-p0.par").exists()
