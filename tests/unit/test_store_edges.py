"""Resource edges of the store: refusals change nothing, concurrency, a full tmpfs, stray entries,
stuck leases, and a fresh start that must not destroy an older, higher timeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from ftd.daemon.store import SegmentStore
from ftd.errors import OutOfMemory, RequestRejected
from ftd.manifest import layout
from ftd.metrics import DaemonMetrics
from tests.unit.storekit import JOB, fill_up, _config, _manifest, _manifests, _metric, _segs, _snapshot, _specs, _store

MiB = 1 << 20


def _state(store: SegmentStore, rank: int = 0) -> dict[str, bytes]:
    """Every file of the rank by name -> its bytes (manifests) or size (segments)."""
    out = {}
    for path in sorted((store.root / f"rank-{rank}").iterdir()):
        out[path.name] = path.read_bytes() if path.name.endswith(".json") else str(path.stat().st_size).encode()
    return out


# ---- item: a refused Begin changes nothing ----------------------------------------------------


@pytest.mark.parametrize("nbytes", [10 * MiB, 1 << 50])
def test_a_begin_refused_by_the_budget_evicts_nothing(tmp_path, nbytes):
    store = _store(tmp_path, keep=2, memory_budget=str(3 * MiB))
    _snapshot(store, 1)
    _snapshot(store, 2)
    before = _state(store)
    with pytest.raises(OutOfMemory, match="budget"):
        store.begin(JOB, 0, 3, nbytes)
    assert store.list_steps(JOB, 0) == [1, 2]
    assert _state(store) == before
    assert _snapshot(store, 3) == [2, 3], "a request that fits still works afterwards"


def test_a_begin_refused_for_host_memory_evicts_nothing(tmp_path):
    store = _store(tmp_path, keep=2)
    _snapshot(store, 1)
    _snapshot(store, 2)
    before = _state(store)
    store.config = store.config.__class__(**{**store.config.__dict__,
                                              "memory_reserve": psutil.virtual_memory().available - 8 * MiB})
    with pytest.raises(OutOfMemory, match="reserve"):
        store.begin(JOB, 0, 3, 512 * MiB)
    assert store.list_steps(JOB, 0) == [1, 2]
    assert _state(store) == before


# ---- item: concurrent Begins count allocations in flight -------------------------------------


def _race(store: SegmentStore, ranks: int, nbytes: int) -> list[int]:
    accepted: list[int] = []
    start = threading.Barrier(ranks)

    def one(rank: int) -> None:
        start.wait()
        try:
            lease = store.begin(JOB, rank, 1, nbytes)
        except OutOfMemory:
            return
        accepted.append(lease.capacity)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted


def test_concurrent_begins_never_exceed_the_budget(tmp_path):
    store = _store(tmp_path, memory_budget=str(8 * MiB))
    accepted = _race(store, 16, 2 * MiB)
    assert sum(accepted) <= 8 * MiB
    assert len(accepted) == 4
    assert store.held_bytes() <= 8 * MiB


@pytest.fixture
def dev_shm():
    """A directory on the host's /dev/shm: its pages count against available memory (a disk /tmp's don't)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    path = Path(tempfile.mkdtemp(prefix="ftd-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_concurrent_begins_never_overshoot_the_host_memory_reserve(tmp_path, dev_shm):
    # sparse segments (never faulted in here): 24 x 256 MiB would all fit if allocations in flight were not counted
    headroom, size, ranks = 512 * MiB, 256 * MiB, 24
    store = _store(tmp_path, shm_dir=str(dev_shm),
                   memory_reserve=str(psutil.virtual_memory().available - headroom))
    accepted = _race(store, ranks, size)
    # 2 segments fit the headroom; other processes' memory moves meanwhile (seen: by ~130 MiB), not by 2 GiB
    assert sum(accepted) <= headroom + 2048 * MiB, f"{len(accepted)} x 256 MiB accepted with 512 MiB of headroom"
    assert store.metrics.registry.get_sample_value("ftd_refused_snapshots_total", {"reason": "host_memory"})


# ---- item: a full tmpfs -----------------------------------------------------------------------




def test_a_full_tmpfs_reuses_the_oldest_segment_and_snapshots_continue(tmp_path, small_tmpfs):
    # shm_dir is tmp_path/shm: the 3 MiB tmpfs, room for 2 segments; spare_segment asks for a third
    store = _store(tmp_path, keep=2, spare_segment=True)
    assert _snapshot(store, 1) == [1]
    assert _snapshot(store, 2) == [1, 2]
    for step in range(3, 8):
        assert _snapshot(store, step) == [step - 1, step], f"step {step} was not taken"
    assert len(_segs(store)) == 2
    assert _metric(store, "ftd_refused_snapshots_total", {"reason": "shm_full_reused"}) >= 1
    assert not list(store.root.rglob("*.tmp"))


def test_enospc_at_commit_is_out_of_memory_and_leaves_no_temp_file(tmp_path, small_tmpfs):
    store = _store(tmp_path, keep=2)
    _snapshot(store, 1)
    _, total = layout(_specs(2))
    lease = store.begin(JOB, 0, 2, total)
    manifest = _manifest(2, lease.path).to_json()
    fill_up(small_tmpfs)
    with pytest.raises(OutOfMemory, match="full"):
        store.commit(JOB, 0, 2, lease.lease, manifest)
    assert not list(store.root.rglob("*.tmp"))
    assert store.list_steps(JOB, 0) == [1]
    with pytest.raises(RequestRejected):  # the lease ended: the segment is free for the next Begin
        store.commit(JOB, 0, 2, lease.lease, manifest)
    (small_tmpfs / "filler").unlink()
    assert _snapshot(store, 2) == [1, 2]


# ---- item: stray entries never stop adoption --------------------------------------------------


def test_stray_entries_are_skipped_at_adoption(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    rank_dir = store.root / "rank-0"
    (rank_dir / "dangling.seg").symlink_to(tmp_path / "nowhere")
    (rank_dir / "adir.seg").mkdir()
    os.mkfifo(rank_dir / "fifo.seg")
    (rank_dir / "dir.tmp").mkdir()
    (rank_dir / "deep.seg").write_bytes(bytes(MiB))
    (rank_dir / "deep.manifest.json").write_bytes(b"[" * 5000 + b"]" * 5000)
    (rank_dir / "huge.seg").write_bytes(bytes(MiB))
    with open(rank_dir / "huge.manifest.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: over the manifest bound
    (rank_dir / "mdir.seg").write_bytes(bytes(MiB))
    (rank_dir / "mdir.manifest.json").mkdir()
    (store.root / "rank-7").write_bytes(b"a file where a rank directory belongs")
    (store.root / "rank-8").symlink_to(tmp_path)
    again = SegmentStore(_config(tmp_path), DaemonMetrics())
    adopted, dropped = again.adopt()
    assert adopted == 1 and again.list_steps(JOB, 0) == [1]
    assert dropped == 3, "the segments with bad manifests are half-written: dropped"
    skipped = {reason: _metric(again, "ftd_shm_entries_skipped_total", {"reason": reason})
               for reason in ("symlink", "not_regular", "unsafe_rank_dir")}
    assert skipped == {"symlink": 1, "not_regular": 3, "unsafe_rank_dir": 2}
    assert _snapshot(again, 2) == [1, 2]


# ---- item: stuck leases are reclaimed ---------------------------------------------------------


def test_a_lease_past_lease_timeout_is_reclaimed_and_does_not_starve_other_ranks(tmp_path):
    store = _store(tmp_path, memory_budget=str(2 * MiB), lease_timeout="0.2")
    stuck = store.begin(JOB, 0, 1, 2 * MiB)
    with pytest.raises(OutOfMemory):  # still within its bound
        store.begin(JOB, 1, 1, MiB)
    time.sleep(0.3)
    lease = store.begin(JOB, 1, 1, MiB)
    assert store.commit(JOB, 1, 1, lease.lease, _manifest(1, lease.path, rank=1).to_json()) == [1]
    assert _metric(store, "ftd_snapshots_aborted_total", {"reason": "lease_timeout"}) == 1
    with pytest.raises(RequestRejected):
        store.commit(JOB, 0, 1, stuck.lease, _manifest(1).to_json())
    assert not Path(stuck.path).exists()


def test_a_lease_of_a_rank_whose_process_is_gone_is_reclaimed(tmp_path):
    store = _store(tmp_path, memory_budget=str(2 * MiB))
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert store.note_client(0, trainer.pid)
        stuck = store.begin(JOB, 0, 1, 2 * MiB)
        with pytest.raises(OutOfMemory):  # its process is alive: the lease stands
            store.begin(JOB, 1, 1, MiB)
    finally:
        trainer.kill()
        trainer.wait()
    lease = store.begin(JOB, 1, 1, MiB)
    assert store.commit(JOB, 1, 1, lease.lease, _manifest(1, lease.path, rank=1).to_json()) == [1]
    assert _metric(store, "ftd_snapshots_aborted_total", {"reason": "client_gone"}) == 1
    with pytest.raises(RequestRejected):
        store.commit(JOB, 0, 1, stuck.lease, _manifest(1).to_json())


def test_a_pid_the_daemon_cannot_see_is_not_tracked(tmp_path):
    store = _store(tmp_path)
    assert not store.note_client(0, 1 << 30)


# ---- item: a fresh start keeps the higher timeline; owner-keyed pins -------------------------


def test_a_fresh_start_survives_a_daemon_restart_and_a_relaunch_restores_the_higher_step(tmp_path):
    store = _store(tmp_path, keep=2)
    for step in (99, 100):
        _snapshot(store, step)
    for step in range(0, 6):  # the trainer could not reach its daemon and started over
        _snapshot(store, step)
    assert store.list_steps(JOB, 0) == [4, 5, 99, 100]
    again = SegmentStore(_config(tmp_path, keep=2), DaemonMetrics())
    again.adopt()
    assert again.list_steps(JOB, 0) == [4, 5, 99, 100]
    assert max(again.list_steps(JOB, 0)) == 100  # what restore() resumes
    assert again.discard(JOB, 0, 100) == []
    assert _snapshot(again, 101) == [100, 101]


def test_under_a_budget_the_older_timeline_is_kept_and_the_new_snapshot_refused(tmp_path):
    store = _store(tmp_path, keep=2, memory_budget=str(3 * MiB))
    for step in (50, 60, 1):
        _snapshot(store, step)
    with pytest.raises(OutOfMemory, match="older timeline"):
        _snapshot(store, 2)
    assert store.list_steps(JOB, 0) == [1, 50, 60]
    assert len(_manifests(store)) == 3


def test_discard_all_drops_every_step_and_gives_memory_back(tmp_path):
    store = _store(tmp_path, keep=2)
    for step in (50, 60, 1):
        _snapshot(store, step)
    _snapshot(store, 7, rank=1)
    assert store.discard_all(JOB) == [(0, 1), (0, 50), (0, 60), (1, 7)]
    assert store.list_steps(JOB, 0) == [] and store.list_steps(JOB, 1) == []
    assert store.held_bytes() == 0 and not list(store.root.rglob("*.seg"))


def test_pins_are_kept_per_owner(tmp_path):
    store = _store(tmp_path, keep=1)
    _snapshot(store, 1)
    store.pin({1}, owner="uploader")
    _snapshot(store, 2)
    store.pin({2})  # the default owner (protection) replaces only its own pins
    _snapshot(store, 3)
    assert store.list_steps(JOB, 0) == [1, 2, 3]
    store.pin(set())
    assert store.list_steps(JOB, 0) == [1, 3]
    store.pin(set(), owner="uploader")
    assert store.list_steps(JOB, 0) == [3]


# ---- item: another run of the job ------------------------------------------------------------


def _run_snapshot(store: SegmentStore, step: int, run: str) -> list[int]:
    _, total = layout(_specs(step))
    lease = store.begin(JOB, 0, step, total)
    return store.commit(JOB, 0, step, lease.lease, _manifest(step, lease.path, run=run).to_json())


def test_another_runs_steps_are_evicted_first_and_never_kept_as_an_older_timeline(tmp_path):
    store = _store(tmp_path, keep=2, memory_budget=str(3 * MiB))
    for step in (50, 60):
        _run_snapshot(store, step, "run-a")
    # a new launch (run-b) starts at 1: run-a's higher steps go first, and no snapshot is refused for them
    assert _run_snapshot(store, 1, "run-b") == [1, 60]
    assert _run_snapshot(store, 2, "run-b") == [1, 2]
    assert _run_snapshot(store, 3, "run-b") == [2, 3]
    assert _metric(store, "ftd_stale_timeline_steps", {"rank": "0"}) == 0
    again = SegmentStore(_config(tmp_path, keep=2), DaemonMetrics())
    again.adopt()  # the run of each step comes back from its manifest
    assert [s.run for s in sorted(again._slots[0], key=lambda s: s.step or 0) if s.step] == ["run-b", "run-b"]


def test_the_same_run_still_keeps_its_older_higher_timeline(tmp_path):
    store = _store(tmp_path, keep=2)
    for step in (99, 100, 0, 1):
        _run_snapshot(store, step, "run-a")
    assert store.list_steps(JOB, 0) == [0, 1, 99, 100]
