"""ftd.daemon.store.SegmentStore on its own (no gRPC): protocol, retention, budget, re-adoption."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from ftd.daemon.slots import Source
from ftd.daemon.store import SEGMENT_ROUNDING, SegmentStore
from ftd.errors import ManifestError, NotFound, OutOfMemory, RequestRejected
from ftd.manifest import Manifest, chunk_checksums, layout
from ftd.metrics import DaemonMetrics

from tests.unit.storekit import (
    CHUNK,
    JOB,
    MiB,
    _config,
    _manifest,
    _manifests,
    _metric,
    _segs,
    _snapshot,
    _specs,
    _store,
)


# ---- the protocol -----------------------------------------------------------------------------


def test_begin_commit_list_open(tmp_path):
    store = _store(tmp_path)
    assert store.list_steps(JOB, 0) == []
    _, total = layout(_specs(4))
    lease = store.begin(JOB, 0, 4, total)
    assert lease.capacity >= total and lease.capacity % SEGMENT_ROUNDING == 0
    assert os.path.getsize(lease.path) == lease.capacity
    assert Path(lease.path).parent == store.root / "rank-0"
    assert lease.lease > 0
    assert store.list_steps(JOB, 0) == []  # not sealed yet
    with pytest.raises(NotFound):
        store.open(JOB, 0, 4)
    manifest = _manifest(4, lease.path)
    raw = manifest.to_json()
    assert store.commit(JOB, 0, 4, lease.lease, raw) == [4]
    assert store.list_steps(JOB, 0) == [4]
    path, capacity, got, source = store.open(JOB, 0, 4)
    assert source == "local"
    assert (path, capacity, got) == (lease.path, lease.capacity, raw)
    assert Path(path).with_suffix(".manifest.json").read_bytes() == raw
    # the bytes the rank wrote are still there and verify against the manifest
    with open(path, "rb") as f:
        Manifest.from_json(got).verify(memoryview(f.read()))
    assert _metric(store, "ftd_snapshots_sealed_total", {"rank": "0"}) == 1
    summary = store.summary()
    assert [(r.rank, r.sealed_steps, r.held_bytes, r.writing) for r in summary] == [(0, [4], lease.capacity, False)]
    assert store.held_bytes() == lease.capacity


def test_ranks_are_independent(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1, rank=0)
    _snapshot(store, 2, rank=3)
    assert store.list_steps(JOB, 0) == [1]
    assert store.list_steps(JOB, 3) == [2]
    assert store.list_steps(JOB, 1) == []
    with pytest.raises(NotFound):
        store.open(JOB, 3, 1)


def test_abort_frees_the_segment(tmp_path):
    store = _store(tmp_path)
    lease = store.begin(JOB, 0, 1, 100)
    store.abort(JOB, 0, 1, lease.lease, "testing")
    with pytest.raises(RequestRejected):
        store.commit(JOB, 0, 1, lease.lease, _manifest(1).to_json())
    assert store.summary()[0].writing is False
    lease2 = store.begin(JOB, 0, 2, 100)
    assert lease2.path == lease.path  # the aborted segment is reused
    assert _metric(store, "ftd_snapshots_aborted_total", {"reason": "client"}) == 1


def test_abort_with_wrong_lease_is_refused(tmp_path):
    store = _store(tmp_path)
    lease = store.begin(JOB, 0, 1, 100)
    with pytest.raises(RequestRejected):
        store.abort(JOB, 0, 1, lease.lease + 1, "wrong")
    assert store.summary()[0].writing is True


@pytest.mark.parametrize("rank,step,nbytes", [(-1, 0, 10), (1 << 20, 0, 10), (0, -1, 10), (0, 0, 0), (0, 0, -5)])
def test_bad_begin_arguments_refused(tmp_path, rank, step, nbytes):
    store = _store(tmp_path)
    with pytest.raises(RequestRejected):
        store.begin(JOB, rank, step, nbytes)
    assert not list(store.root.rglob("*.seg"))


# ---- retention --------------------------------------------------------------------------------


@pytest.mark.parametrize("spare, segments", [(False, 2), (True, 3)])
def test_keep_two_retention_reuses_segment_files(tmp_path, spare, segments):
    """keep=2 holds two segments: the next step is written over the older one (spare_segment: keep + 1)."""
    store = _store(tmp_path, keep=2, spare_segment=spare)
    files_seen: set[Path] = set()
    for step in range(1, 11):
        if step > 2:
            lease = store.begin(JOB, 0, step, 4096)
            assert store.list_steps(JOB, 0) == ([step - 2, step - 1] if spare else [step - 1]), \
                "while a step is written the newest sealed one always stays"
            store.abort(JOB, 0, step, lease.lease, "test")
        held = _snapshot(store, step)
        assert held == list(range(max(1, step - 1), step + 1))
        assert store.list_steps(JOB, 0) == held
        segs = _segs(store)
        files_seen.update(segs)
        assert len(segs) == min(step, segments)
        assert len(_manifests(store)) == len(held)  # a manifest exactly while sealed
    # steady state: nothing new was allocated after the first ones
    assert len(files_seen) == segments
    assert store.held_bytes() == segments * SEGMENT_ROUNDING
    for step in (9, 10):
        assert Manifest.from_json(store.open(JOB, 0, step)[2]).step == step
    with pytest.raises(NotFound):
        store.open(JOB, 0, 8)


def test_keep_one(tmp_path):
    store = _store(tmp_path, keep=1)
    for step in range(1, 6):
        assert _snapshot(store, step) == [step]
    assert len(_segs(store)) == 2


def test_recommit_of_same_step_replaces_it(tmp_path):
    store = _store(tmp_path, keep=3)
    _snapshot(store, 1)
    _snapshot(store, 2)
    first = store.open(JOB, 0, 2)[0]
    assert _snapshot(store, 2) == [1, 2]
    assert store.open(JOB, 0, 2)[0] != first
    assert len(_manifests(store)) == 2


def test_growing_state_gets_a_bigger_segment(tmp_path):
    store = _store(tmp_path, keep=2)
    for step in (1, 2, 3):
        _snapshot(store, step)
    lease = store.begin(JOB, 0, 4, 3 * MiB + 1)
    assert lease.capacity == 4 * MiB
    store.commit(JOB, 0, 4, lease.lease, _manifest(4, lease.path).to_json())
    assert store.list_steps(JOB, 0) == [3, 4]
    assert len(_segs(store)) == 2  # step 2's too-small segment was given back, not kept beside the new one


# ---- superseding ------------------------------------------------------------------------------


def test_unfinished_begin_is_superseded(tmp_path):
    store = _store(tmp_path)
    old = store.begin(JOB, 0, 1, 1000)
    new = store.begin(JOB, 0, 2, 1000)
    assert new.lease != old.lease
    assert new.path == old.path  # the abandoned segment is reused, not leaked
    assert len(_segs(store)) == 1
    with pytest.raises(RequestRejected, match="no lease"):
        store.commit(JOB, 0, 1, old.lease, _manifest(1, old.path).to_json())
    assert store.commit(JOB, 0, 2, new.lease, _manifest(2, new.path).to_json()) == [2]
    assert _metric(store, "ftd_snapshots_aborted_total", {"reason": "superseded"}) == 1


def test_superseding_same_step_keeps_sealed_steps(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    store.begin(JOB, 0, 2, 1000)
    lease = store.begin(JOB, 0, 2, 1000)
    store.commit(JOB, 0, 2, lease.lease, _manifest(2, lease.path).to_json())
    assert store.list_steps(JOB, 0) == [1, 2]


# ---- refused commits --------------------------------------------------------------------------


def test_commit_with_wrong_lease_refused_and_lease_survives(tmp_path):
    store = _store(tmp_path)
    lease = store.begin(JOB, 0, 1, 1000)
    raw = _manifest(1, lease.path).to_json()
    with pytest.raises(RequestRejected, match="no lease"):
        store.commit(JOB, 0, 1, lease.lease ^ 1, raw)
    with pytest.raises(RequestRejected):
        store.commit(JOB, 0, 2, lease.lease, _manifest(2).to_json())  # right lease, wrong step
    assert store.list_steps(JOB, 0) == []
    assert store.commit(JOB, 0, 1, lease.lease, raw) == [1]


def test_commit_for_wrong_job_refused(tmp_path):
    store = _store(tmp_path)
    lease = store.begin(JOB, 0, 1, 1000)
    with pytest.raises(RequestRejected, match="other"):
        store.commit("other", 0, 1, lease.lease, _manifest(1, job="other").to_json())
    # the commit names the right job, the manifest another
    with pytest.raises(ManifestError, match="other"):
        store.commit(JOB, 0, 1, lease.lease, _manifest(1, job="other").to_json())
    with pytest.raises(ManifestError):
        store.commit(JOB, 0, 1, lease.lease, _manifest(1, rank=1).to_json())
    with pytest.raises(ManifestError):
        store.commit(JOB, 0, 1, lease.lease, _manifest(2).to_json())
    assert not _manifests(store)
    assert store.commit(JOB, 0, 1, lease.lease, _manifest(1, lease.path).to_json()) == [1]


def test_commit_with_manifest_outside_segment_refused(tmp_path):
    store = _store(tmp_path)
    lease = store.begin(JOB, 0, 1, 1000)
    m = _manifest(1, lease.path)
    too_big = dataclasses.replace(m, data_bytes=lease.capacity + 64)
    with pytest.raises(ManifestError, match="segment holds"):
        store.commit(JOB, 0, 1, lease.lease, too_big.to_json())
    last = dataclasses.replace(m.entries[-1], offset=lease.capacity)
    outside = dataclasses.replace(m, entries=m.entries[:-1] + (last,), data_bytes=lease.capacity)
    with pytest.raises(ManifestError, match="outside"):
        store.commit(JOB, 0, 1, lease.lease, outside.to_json())
    with pytest.raises(ManifestError):
        store.commit(JOB, 0, 1, lease.lease, b"{not json")
    assert not _manifests(store) and not list(store.root.rglob("*.tmp"))
    assert store.list_steps(JOB, 0) == []


def test_wrong_job_rejected_everywhere(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    for call in (lambda: store.begin("b", 0, 2, 10), lambda: store.list_steps("b", 0), lambda: store.open("b", 0, 1),
                 lambda: store.discard("b", 0, 0), lambda: store.abort("b", 0, 1, 1, "x")):
        with pytest.raises(RequestRejected, match="'b'"):
            call()
    assert store.list_steps(JOB, 0) == [1]


# ---- memory budget ----------------------------------------------------------------------------


def test_budget_refuses_a_segment_that_does_not_fit(tmp_path):
    store = _store(tmp_path, memory_budget="1MiB")
    with pytest.raises(OutOfMemory) as err:
        store.begin(JOB, 0, 1, MiB + 1)
    message = str(err.value)
    assert "budget" in message and str(2 * MiB) in message and str(MiB) in message
    assert not _segs(store)
    assert _metric(store, "ftd_refused_snapshots_total", {"reason": "budget"}) == 1


def test_budget_counts_all_ranks(tmp_path):
    store = _store(tmp_path, memory_budget="2MiB")
    _snapshot(store, 1, rank=0)
    _snapshot(store, 1, rank=1)
    with pytest.raises(OutOfMemory, match="rank 2"):
        store.begin(JOB, 2, 1, 100)
    # one sealed step is all rank 0 has: it is not evicted to make room
    with pytest.raises(OutOfMemory):
        store.begin(JOB, 0, 2, 100)
    assert store.list_steps(JOB, 0) == [1]


def test_budget_evicts_oldest_early_when_two_are_held(tmp_path):
    store = _store(tmp_path, memory_budget="2MiB", keep=3)
    _snapshot(store, 1)
    _snapshot(store, 2)
    assert _snapshot(store, 3) == [2, 3]
    assert len(_segs(store)) == 2
    assert store.held_bytes() <= 2 * MiB


def test_host_memory_reserve_refuses(tmp_path):
    store = _store(tmp_path, memory_reserve="1000TiB")
    with pytest.raises(OutOfMemory, match="reserve"):
        store.begin(JOB, 0, 1, 100)
    assert _metric(store, "ftd_refused_snapshots_total", {"reason": "host_memory"}) == 1


# ---- discard ----------------------------------------------------------------------------------


def test_discard_above_step(tmp_path):
    store = _store(tmp_path, keep=4)
    for step in (1, 2, 3, 4):
        _snapshot(store, step)
    assert store.discard(JOB, 0, 2) == [3, 4]
    assert store.list_steps(JOB, 0) == [1, 2]
    assert len(_manifests(store)) == 2
    assert store.discard(JOB, 0, 2) == []
    with pytest.raises(NotFound):
        store.open(JOB, 0, 3)
    # the freed segments are reused
    n = len(_segs(store))
    _snapshot(store, 3)
    assert len(_segs(store)) == n
    assert store.discard(JOB, 0, 0) == [1, 2, 3]
    assert store.list_steps(JOB, 0) == []
    assert store.discard(JOB, 7, 0) == []  # a rank never seen


def test_discard_leaves_a_write_in_progress(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    lease = store.begin(JOB, 0, 5, 100)
    assert store.discard(JOB, 0, 0) == [1]
    assert store.commit(JOB, 0, 5, lease.lease, _manifest(5, lease.path).to_json()) == [5]


# ---- restart and re-adoption ------------------------------------------------------------------


def test_adopt_after_restart(tmp_path):
    store = _store(tmp_path, keep=3)
    raws = {}
    for step in (1, 2):
        _snapshot(store, step)
        raws[step] = store.open(JOB, 0, step)[2]
    _snapshot(store, 1, rank=4)
    half = store.begin(JOB, 0, 3, 100)  # never committed: no manifest
    assert len(_segs(store)) == 3

    again = SegmentStore(_config(tmp_path, keep=3), DaemonMetrics())
    assert again.adopt() == (3, 1)
    assert again.list_steps(JOB, 0) == [1, 2]
    assert again.list_steps(JOB, 4) == [1]
    assert not Path(half.path).exists()
    assert len(_segs(again)) == 2
    for step in (1, 2):
        path, capacity, raw, _ = again.open(JOB, 0, step)
        assert raw == raws[step]
        assert capacity == os.path.getsize(path)
        with open(path, "rb") as f:
            Manifest.from_json(raw).verify(memoryview(f.read()))
    assert _metric(again, "ftd_segments_adopted_total") == 3
    assert _metric(again, "ftd_segments_dropped_total") == 1
    # the adopted store carries on: retention and reuse work as before
    assert _snapshot(again, 3) == [1, 2, 3]
    assert _snapshot(again, 4) == [2, 3, 4]
    assert len(_segs(again)) == 3  # keep 3: step 4 went into step 1's segment (segments_per_rank)


def test_adopt_drops_corrupt_and_foreign_manifests(tmp_path):
    store = _store(tmp_path, keep=5)
    for step in (1, 2, 3, 4, 5):
        _snapshot(store, step)
    by_step = {step: Path(store.open(JOB, 0, step)[0]) for step in (1, 2, 3, 4, 5)}
    by_step[1].with_suffix(".manifest.json").write_bytes(b"garbage{")
    wrong_job = _manifest(2, job="someone-else").to_json()
    by_step[2].with_suffix(".manifest.json").write_bytes(wrong_job)
    wrong_rank = _manifest(3, rank=1).to_json()
    by_step[3].with_suffix(".manifest.json").write_bytes(wrong_rank)
    outside = dataclasses.replace(_manifest(4), data_bytes=SEGMENT_ROUNDING * 2).to_json()
    by_step[4].with_suffix(".manifest.json").write_bytes(outside)
    # leftovers of a crash: a temp manifest, an orphan manifest, a directory that is not a rank
    (store.root / "rank-0" / "abc.tmp").write_bytes(b"x")
    (store.root / "rank-0" / "dead.manifest.json").write_bytes(_manifest(9).to_json())
    (store.root / "rank-x").mkdir()

    again = SegmentStore(_config(tmp_path, keep=5), DaemonMetrics())
    assert again.adopt() == (1, 4)
    assert again.list_steps(JOB, 0) == [5]
    assert [p.name for p in _segs(again)] == [by_step[5].name]
    assert _manifests(again) == [by_step[5].with_suffix(".manifest.json")]
    assert not list((store.root / "rank-0").glob("*.tmp"))


def test_adopt_applies_retention(tmp_path):
    store = _store(tmp_path, keep=4)
    for step in (1, 2, 3, 4):
        _snapshot(store, step)
    again = SegmentStore(_config(tmp_path, keep=2), DaemonMetrics())
    assert again.adopt() == (4, 0)
    assert again.list_steps(JOB, 0) == [3, 4]
    assert len(_manifests(again)) == 2
    # the evicted segments stay as free slots and are reused before anything new is allocated
    _snapshot(again, 5)
    assert len(_segs(again)) == 4


def test_other_job_on_same_shm_dir_is_separate(tmp_path):
    a = _store(tmp_path)
    _snapshot(a, 1)
    b = SegmentStore(_config(tmp_path, job="job-b"), DaemonMetrics())
    assert b.adopt() == (0, 0)
    assert b.list_steps("job-b", 0) == []
    with pytest.raises(RequestRejected):
        b.list_steps(JOB, 0)
    assert a.list_steps(JOB, 0) == [1]


def test_adopt_refuses_segments_of_another_job_moved_in(tmp_path):
    a = _store(tmp_path)
    _snapshot(a, 1)
    os.rename(a.root, a.root.parent / "ftd-job-b")
    b = SegmentStore(_config(tmp_path, job="job-b"), DaemonMetrics())
    assert b.adopt() == (0, 1)
    assert b.list_steps("job-b", 0) == []


# ---- damage behind the daemon's back ----------------------------------------------------------


def test_a_fresh_start_keeps_the_higher_steps_of_the_older_timeline(tmp_path):
    store = _store(tmp_path, keep=2)
    _snapshot(store, 50)
    _snapshot(store, 60)
    # training started over from scratch: the new timeline's steps are lower; the old ones stay
    assert _snapshot(store, 1) == [1, 50, 60]
    assert _snapshot(store, 2) == [1, 2, 50, 60]
    assert _snapshot(store, 3) == [2, 3, 50, 60]
    assert store.summary()[0].stale_steps == [50, 60]
    assert _metric(store, "ftd_stale_timeline_steps", {"rank": "0"}) == 2
    # a restore of step 60 continues the older timeline: the fresh start's steps go by retention
    assert _snapshot(store, 61) == [60, 61]


def test_truncated_free_segment_is_replaced(tmp_path):
    store = _store(tmp_path, keep=2, spare_segment=True)  # a free segment stays beside the two sealed
    for step in (1, 2, 3):
        _snapshot(store, step)
    sealed_paths = {store.open(JOB, 0, s)[0] for s in (2, 3)}
    (free,) = [p for p in _segs(store) if str(p) not in sealed_paths]
    os.truncate(free, 0)
    lease = store.begin(JOB, 0, 4, 100)
    assert lease.path != str(free)
    assert not free.exists()
    assert os.path.getsize(lease.path) == lease.capacity
    assert store.commit(JOB, 0, 4, lease.lease, _manifest(4, lease.path).to_json()) == [3, 4]


def test_open_reports_missing_manifest_as_not_found(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 1)
    path = Path(store.open(JOB, 0, 1)[0])
    path.with_suffix(".manifest.json").unlink()
    with pytest.raises(NotFound, match="manifest"):
        store.open(JOB, 0, 1)


@pytest.mark.parametrize("keep, spare, segments", [(2, False, 2), (2, True, 3), (3, False, 3)])
def test_preallocation_prepares_segments_per_rank(tmp_path, keep, spare, segments):
    store = _store(tmp_path, preallocate=True, keep=keep, spare_segment=spare)
    lease = store.begin(JOB, 0, 1, 3 << 20)
    deadline = time.monotonic() + 10
    while len(list((tmp_path / "shm").rglob("*.seg"))) < segments or store.held_bytes() < segments * lease.capacity:
        assert time.monotonic() < deadline, f"the background thread did not prepare {segments} segments"
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(list((tmp_path / "shm").rglob("*.seg"))) == segments, "never more than segments_per_rank"
    for seg in (tmp_path / "shm").rglob("*.seg"):
        assert seg.stat().st_size == lease.capacity
        assert seg.stat().st_blocks * 512 >= lease.capacity, f"{seg.name} was not pre-faulted"


def test_a_rank_that_moved_away_does_not_block_complete_steps(tmp_path):
    """torchrun reassigns ranks: rank 2's old snapshots stay, rank 0 now trains here."""
    store = _store(tmp_path, keep=2)
    for rank, steps in ((2, (5, 6)), (0, (6, 7, 8, 9, 10, 11))):
        for step in steps:
            _snapshot(store, step, rank)
    complete = store.complete_steps()
    assert sorted(complete) == [10, 11], "rank 2 lags by more than keep + 2 steps: only rank 0 counts"
    assert [rank for rank, *_ in complete[11]] == [0]


def test_pinned_steps_survive_retention(tmp_path):
    store = _store(tmp_path, keep=2)
    _snapshot(store, 1)
    store.pin({1})
    for step in (2, 3, 4):
        _snapshot(store, step)
    assert store.list_steps(JOB, 0) == [1, 3, 4]
    store.pin(set())
    assert store.list_steps(JOB, 0) == [3, 4]


def test_newest_sealed_step_follows_seal_time_not_step_number(tmp_path):
    """After a fresh start the newest state has a lower step number than stale snapshots still held."""
    store = _store(tmp_path, keep=3)
    assert store.newest_sealed_step() is None
    for step in (40, 41):
        _snapshot(store, step)
    assert store.newest_sealed_step() == 41
    _snapshot(store, 1)  # training started again from scratch
    assert store.newest_sealed_step() == 1
    _snapshot(store, 2, rank=1)
    assert store.newest_sealed_step() == 2


def test_after_a_fresh_start_stale_higher_steps_do_not_block_complete_steps(tmp_path):
    """Rank 1 moved away at step 40; training then started again from scratch with rank 0 here."""
    store = _store(tmp_path, keep=2)
    for step in (39, 40):
        _snapshot(store, step, rank=1)
    for step in (1, 2, 3):
        _snapshot(store, step, rank=0)
    assert sorted(store.complete_steps()) == [2, 3]


def test_ranks_in_lockstep_all_count_whichever_sealed_last(tmp_path):
    store = _store(tmp_path, keep=2)
    for rank, step in ((0, 4), (1, 4), (0, 5), (1, 5), (0, 6)):
        _snapshot(store, step, rank=rank)
    assert sorted(store.complete_steps()) == [5]
    assert sorted(rank for rank, *_ in store.complete_steps()[5]) == [0, 1]
    _snapshot(store, 6, rank=1)
    assert sorted(store.complete_steps()) == [5, 6]


def test_blob_parts_leave_out_segments_fetched_for_a_moved_rank_even_after_a_restart(tmp_path):
    """A node's blob (what EC protects) is its own data of a step, whatever ranks train here now."""
    store = _store(tmp_path, keep=3)
    _snapshot(store, 7, rank=0)
    _, total = layout(_specs(7))
    data = bytes((7 * 31 + i) % 256 for i in range(total))
    fetched = _manifest(7, rank=1)
    fetched = dataclasses.replace(fetched, entries=tuple(
        dataclasses.replace(e, checksums=chunk_checksums(memoryview(data)[e.offset:e.offset + e.nbytes], CHUNK))
        for e in fetched.entries))
    store.install_sealed(1, 7, fetched.to_json(), memoryview(data), source=Source.FETCHED)
    assert [rank for rank, *_ in store.blob_parts(7)] == [0]
    assert sorted(store.complete_steps()[7], key=lambda p: p[0])[1][0] == 1  # both ranks hold step 7
    again = SegmentStore(_config(tmp_path, keep=3), DaemonMetrics())
    again.adopt()
    assert [rank for rank, *_ in again.blob_parts(7)] == [0]
    assert again.list_steps(JOB, 1) == [7]


def test_adopt_can_leave_retention_to_the_first_pin(tmp_path):
    """A restarted daemon with peers pins its protected step (older than the newest `keep`) first."""
    store = _store(tmp_path, keep=4)
    for step in (1, 2, 3, 4):
        _snapshot(store, step)
    again = SegmentStore(_config(tmp_path, keep=2), DaemonMetrics())
    assert again.adopt(retain=False) == (4, 0)
    again.pin({1})
    assert again.list_steps(JOB, 0) == [1, 3, 4]
