"""The shm directory is not trusted: private modes, refused foreign/loose directories, no symlinks followed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ftd.daemon.store import SegmentStore
from ftd.errors import FtdError, OutOfMemory
from ftd.manifest import layout
from ftd.metrics import DaemonMetrics
from tests.unixusers import run_as, second_user
from tests.unit.storekit import JOB, _config, _manifest, _metric, _snapshot, _specs, _store

def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_store_creates_everything_private(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    rank_dir = store.root / "rank-0"
    assert _mode(store.root) == 0o700
    assert _mode(rank_dir) == 0o700
    for entry in rank_dir.iterdir():
        assert _mode(entry) == 0o600, entry.name
    assert len(list(rank_dir.glob("*.manifest.json"))) == 1




def test_a_job_directory_created_first_by_another_user_is_refused(tmp_path, shared_dir):
    other = second_user()
    root = shared_dir / f"ftd-{JOB}"
    run_as(other, lambda: os.mkdir(root, 0o777))
    assert os.lstat(root).st_uid == other.pw_uid
    store = SegmentStore(_config(tmp_path, shm_dir=str(shared_dir)), DaemonMetrics())
    with pytest.raises(FtdError, match="owned by uid"):
        store.adopt()
    with pytest.raises(FtdError, match="owned by uid"):
        store.prepare_root()
    assert list(root.iterdir()) == [], "the daemon wrote nothing into the other user's directory"


def test_a_job_directory_writable_by_others_is_refused(tmp_path):
    root = tmp_path / "shm" / f"ftd-{JOB}"
    root.mkdir(parents=True)
    os.chmod(root, 0o777)
    with pytest.raises(FtdError, match="writable by group or others"):
        SegmentStore(_config(tmp_path), DaemonMetrics()).adopt()


def test_an_own_job_directory_with_a_readable_mode_is_tightened(tmp_path):
    root = tmp_path / "shm" / f"ftd-{JOB}"
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    SegmentStore(_config(tmp_path), DaemonMetrics()).adopt()
    assert _mode(root) == 0o700


def test_a_symlinked_job_directory_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "shm").mkdir()
    (tmp_path / "shm" / f"ftd-{JOB}").symlink_to(elsewhere)
    with pytest.raises(FtdError, match="symlink"):
        SegmentStore(_config(tmp_path), DaemonMetrics()).adopt()
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_rank_directory_is_never_followed(tmp_path):
    store = _store(tmp_path)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (target / "keep.bin").write_bytes(b"precious")
    (store.root / "rank-0").symlink_to(target)
    again = SegmentStore(_config(tmp_path), DaemonMetrics())
    assert again.adopt() == (0, 0)
    assert _metric(again, "ftd_shm_entries_skipped_total", {"reason": "unsafe_rank_dir"}) == 1
    with pytest.raises(OutOfMemory, match="symlink"):
        again.begin(JOB, 0, 1, 100)
    assert sorted(p.name for p in target.iterdir()) == ["keep.bin"]
    assert (target / "keep.bin").read_bytes() == b"precious"


def test_a_symlinked_segment_is_skipped_and_its_target_untouched(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"v" * 5000)
    rank_dir = store.root / "rank-0"
    (rank_dir / "0123456789abcdef.seg").symlink_to(victim)
    (rank_dir / "0123456789abcdef.manifest.json").symlink_to(victim)
    again = SegmentStore(_config(tmp_path), DaemonMetrics())
    assert again.adopt() == (1, 0)
    assert again.list_steps(JOB, 0) == [1]
    assert _metric(again, "ftd_shm_entries_skipped_total", {"reason": "symlink"}) == 1
    for step in (2, 3, 4):
        _snapshot(again, step)
    assert victim.read_bytes() == b"v" * 5000


def test_a_symlink_planted_at_the_manifest_temp_is_not_followed(tmp_path):
    store = _store(tmp_path)
    _, total = layout(_specs(1))
    lease = store.begin(JOB, 0, 1, total)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"root's file")
    tmp = Path(lease.path).with_suffix(".manifest.tmp")
    tmp.symlink_to(victim)
    assert store.commit(JOB, 0, 1, lease.lease, _manifest(1, lease.path).to_json()) == [1]
    assert victim.read_bytes() == b"root's file"
    assert not os.path.lexists(tmp)
    manifest = Path(lease.path).with_suffix(".manifest.json")
    assert stat.S_ISREG(os.lstat(manifest).st_mode) and _mode(manifest) == 0o600


def test_a_symlinked_manifest_is_not_read_at_adoption(tmp_path):
    """A sealed-looking segment whose manifest is a symlink to a valid manifest elsewhere is dropped."""
    store = _store(tmp_path)
    _snapshot(store, 1)
    (manifest,) = (store.root / "rank-0").glob("*.manifest.json")
    planted = tmp_path / "planted.json"
    planted.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(planted)
    again = SegmentStore(_config(tmp_path), DaemonMetrics())
    assert again.adopt() == (0, 1)
    assert again.list_steps(JOB, 0) == []
    assert planted.exists(), "the symlink was removed, not its target"


def test_with_a_trainer_group_segments_are_group_read_write(tmp_path):
    gid = os.getgid()
    store = _store(tmp_path, shm_group=gid)
    _snapshot(store, 1)
    assert _mode(store.root) == 0o750 and _mode(store.root / "rank-0") == 0o750
    (seg,) = (store.root / "rank-0").glob("*.seg")
    assert _mode(seg) == 0o660 and os.lstat(seg).st_gid == gid
    (manifest,) = (store.root / "rank-0").glob("*.manifest.json")
    assert _mode(manifest) == 0o600
