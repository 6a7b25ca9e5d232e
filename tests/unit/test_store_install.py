"""SegmentStore.install_sealed and Source: the source persisted beside the segment and read back at
adoption, bad source files skipped, the copy made without the store lock, failures freeing the slot.
Real segment files, real threads; the instrumented stores below run the real copy and prefault."""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from pathlib import Path

import pytest

from ftd.daemon.slots import Slot, SlotState, Source
from ftd.daemon.store import SegmentStore
from ftd.errors import RequestRejected, SnapshotCorrupt
from ftd.manifest import EntrySpec, Manifest, chunk_checksums, layout
from ftd.metrics import DaemonMetrics
from tests.unit.storekit import CHUNK, fill_up, JOB, MiB, _config, _manifest, _metric, _segs, _snapshot, _store

WAIT = 30.0  # seconds a thread that must not be blocked by the store lock gets to finish


def _payload(rank: int, step: int, nbytes: int = 64 << 10) -> tuple[bytes, bytes]:
    """(manifest JSON, data) of a valid snapshot of `nbytes` for (rank, step), as a peer would send it."""
    entries, total = layout([EntrySpec("model/w", "param", "uint8", (nbytes,))])
    data = bytes((step * 7 + rank + i) % 251 for i in range(min(total, 1 << 16))) * (-(-total // (1 << 16)))
    data = data[:total]
    entries = [dataclasses.replace(e, checksums=chunk_checksums(memoryview(data)[e.offset:e.offset + e.nbytes], CHUNK))
               for e in entries]
    manifest = Manifest(job=JOB, rank=rank, world_size=2, step=step, chunk_bytes=CHUNK, data_bytes=total,
                        entries=tuple(entries), meta={})
    return manifest.to_json(), data


def _install(store: SegmentStore, rank: int, step: int, source: Source, nbytes: int = 64 << 10) -> Path:
    manifest_json, data = _payload(rank, step, nbytes)
    store.install_sealed(rank, step, manifest_json, memoryview(data), source=source)
    return Path(store.open(JOB, rank, step)[0])


def _restarted(tmp_path: Path, **overrides) -> SegmentStore:
    again = SegmentStore(_config(tmp_path, **overrides), DaemonMetrics())
    again.adopt()
    return again


def _states(store: SegmentStore, rank: int) -> list[SlotState]:
    with store._lock:
        return sorted((s.state for s in store._slots.get(rank, [])), key=lambda s: s.value)


# ---- the source, persisted --------------------------------------------------------------------


@pytest.mark.parametrize("source", list(Source))
def test_the_source_survives_a_daemon_restart(tmp_path, source):
    store = _store(tmp_path, keep=3)
    seg = _install(store, 1, 7, source)
    wire, in_blob = source.recovery_source, source.in_node_blob
    source_file = seg.with_suffix(".source")
    if source is Source.LOCAL:
        assert not source_file.exists(), "LOCAL is the absence of a source file"
    else:
        assert source_file.read_bytes() == source.value.encode()
        assert stat.S_IMODE(source_file.stat().st_mode) == 0o600
    for s in (store, _restarted(tmp_path, keep=3)):
        assert s.source_of(JOB, 1, 7) is source
        assert s.open(JOB, 1, 7)[3] == wire
        assert bool(s.blob_parts(7)) is in_blob
    assert not list(store.root.rglob("*.tmp"))


def test_a_committed_step_is_local_before_and_after_a_restart(tmp_path):
    store = _store(tmp_path)
    _snapshot(store, 3)
    assert not list(store.root.rglob("*.source"))
    for s in (store, _restarted(tmp_path)):
        assert (s.source_of(JOB, 0, 3), s.open(JOB, 0, 3)[3]) == (Source.LOCAL, "local")
        assert [rank for rank, *_ in s.blob_parts(3)] == [0]


@pytest.mark.parametrize("damage", ["unknown", "empty", "oversized", "symlink", "directory", "not_utf8"])
def test_an_untrustworthy_source_file_is_skipped_and_its_segment_left_alone(tmp_path, damage):
    store = _store(tmp_path, keep=3)
    _snapshot(store, 5, rank=1)
    seg = _install(store, 1, 7, Source.REBUILT)
    source_file = seg.with_suffix(".source")
    source_file.unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"rebuilt")
    if damage == "symlink":
        source_file.symlink_to(target)
    elif damage == "directory":
        source_file.mkdir()
    else:
        source_file.write_bytes({"unknown": b"checkfree", "empty": b"", "oversized": b"rebuilt" + b" " * 100,
                                 "not_utf8": b"\xff\xfe"}[damage])
    again = SegmentStore(_config(tmp_path, keep=3), DaemonMetrics())
    assert again.adopt() == (1, 0), "the good segment is adopted, the doubtful one neither adopted nor dropped"
    assert again.list_steps(JOB, 1) == [5]
    assert _metric(again, "ftd_shm_entries_skipped_total", {"reason": "bad_source"}) == 1
    assert seg.exists() and seg.with_suffix(".manifest.json").exists() and os.path.lexists(source_file)
    assert target.read_bytes() == b"rebuilt"


def test_the_source_file_goes_with_its_segment(tmp_path):
    store = _store(tmp_path, keep=1)
    seg = _install(store, 0, 4, Source.FETCHED)
    _snapshot(store, 5)  # retention evicts the fetched step 4; its segment may be reused
    assert not seg.with_suffix(".source").exists()
    _snapshot(store, 6)  # a local Commit into the segment the fetched step had
    again = _restarted(tmp_path, keep=1)
    assert (again.source_of(JOB, 0, 6), again.blob_parts(6)[0][0]) == (Source.LOCAL, 0)
    seg = _install(again, 0, 9, Source.REBUILT)
    again.discard_all(JOB)  # evicts, then gives the free segments back
    assert not list(again.root.rglob("*.source")) and not seg.exists()


def test_adoption_removes_source_files_of_dropped_and_vanished_segments(tmp_path):
    store = _store(tmp_path, keep=3)
    half = _install(store, 0, 4, Source.FETCHED)
    gone = _install(store, 0, 5, Source.REBUILT)
    half.with_suffix(".manifest.json").unlink()  # as if the daemon died before the manifest was written
    gone.unlink()
    assert _restarted(tmp_path, keep=3).list_steps(JOB, 0) == []
    assert not list(store.root.rglob("*.source")) and not list(store.root.rglob("*.manifest.json"))


def test_an_earlier_versions_foreign_marker_is_read_as_fetched(tmp_path):
    store = _store(tmp_path, keep=3)
    seg = _install(store, 1, 7, Source.FETCHED)
    seg.with_suffix(".source").unlink()
    seg.with_suffix(".foreign").write_bytes(b"")  # what the previous version left
    again = _restarted(tmp_path, keep=3)
    assert again.source_of(JOB, 1, 7) is Source.FETCHED and not again.blob_parts(7)
    assert not seg.with_suffix(".foreign").exists() and seg.with_suffix(".source").read_bytes() == b"fetched"


# ---- install_sealed: the copy, without the lock -------------------------------------------------


class _DuringCopy(SegmentStore):
    """The real store; `during(slot)` runs in the installing thread just before the real copy."""

    during: object = None

    def _copy_into(self, slot: Slot, data: memoryview) -> None:
        if self.during is not None:
            self.during(slot)  # type: ignore[operator]
        super()._copy_into(slot, data)


def _in_thread(fn) -> dict:
    """Run `fn` on a real thread; {"value"| "error": ...} once it returns within WAIT, {} when blocked."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    return dict(out)


def test_install_sealed_copies_without_the_lock_and_nobody_takes_its_segment(tmp_path):
    store = _DuringCopy(_config(tmp_path, keep=2), DaemonMetrics())
    store.adopt()
    _snapshot(store, 3, rank=1)
    seen: dict = {}

    def during(slot: Slot) -> None:
        seen["state"], seen["lease"] = slot.state, slot.lease
        # another rank's whole Begin + Commit, and this rank's Begin, while the copy is about to run
        seen["other"] = _in_thread(lambda: _snapshot(store, 11, rank=0))
        seen["same"] = _in_thread(lambda: store.begin(JOB, 1, 12, 1000))
        seen["summary"] = _in_thread(store.summary)
        seen["path"] = slot.path

    store.during = during
    manifest_json, data = _payload(1, 10, 8 * MiB)
    store.install_sealed(1, 10, manifest_json, memoryview(data), source=Source.REBUILT)
    assert (seen["state"], seen["lease"]) == (SlotState.WRITING, 0), "reserved as the daemon's own write"
    assert seen["other"] == {"value": [11]}, f"rank 0 was blocked or failed during the copy: {seen['other']}"
    assert "value" in seen["same"], f"a Begin of the installing rank was blocked or failed: {seen['same']}"
    assert seen["same"]["value"].path != str(seen["path"]), "the reserved segment was handed out"
    assert [r.writing for r in seen["summary"]["value"] if r.rank == 1] == [True]
    assert store.list_steps(JOB, 1) == [3, 10]
    path, _, _, wire = store.open(JOB, 1, 10)
    assert wire == "peers" and Path(path) == seen["path"]
    with open(path, "rb") as f:
        assert f.read(len(data)) == data


def test_a_corrupt_payload_reserves_and_evicts_nothing(tmp_path):
    store = _store(tmp_path, keep=2, spare_segment=True)
    for step in (1, 2, 3):
        _snapshot(store, step)  # keep 2 and a spare segment: one segment is left free
    assert _states(store, 0) == [SlotState.FREE, SlotState.SEALED, SlotState.SEALED]
    manifest_json, data = _payload(0, 9)
    bad = bytearray(data)
    bad[100] ^= 0xFF
    with pytest.raises(SnapshotCorrupt):
        store.install_sealed(0, 9, manifest_json, memoryview(bytes(bad)), source=Source.FETCHED)
    assert _states(store, 0) == [SlotState.FREE, SlotState.SEALED, SlotState.SEALED]
    assert store.list_steps(JOB, 0) == [2, 3]
    assert not list(store.root.rglob("*.source")) and len(_segs(store)) == 3
    _snapshot(store, 4)
    assert len(_segs(store)) == 3, "the free segment was reused"


def test_a_copy_that_fails_frees_the_reserved_segment(tmp_path):
    store = _DuringCopy(_config(tmp_path, keep=2), DaemonMetrics())
    store.adopt()
    _snapshot(store, 1)
    store.during = lambda slot: slot.path.unlink()  # the segment removed behind the daemon's back
    manifest_json, data = _payload(0, 5)
    with pytest.raises(OSError):
        store.install_sealed(0, 5, manifest_json, memoryview(data), source=Source.REBUILT)
    assert _states(store, 0) == [SlotState.FREE, SlotState.SEALED]
    assert store.list_steps(JOB, 0) == [1] and not list(store.root.rglob("*.source"))
    store.during = None
    assert _snapshot(store, 2) == [1, 2], "the freed (vanished) segment is replaced, snapshots go on"
    assert len(_segs(store)) == 2


def test_a_full_tmpfs_during_install_frees_the_segment(tmp_path, small_tmpfs):
    store = _store(tmp_path, keep=2)  # shm_dir is the 3 MiB tmpfs
    _snapshot(store, 1)
    fill_up(small_tmpfs)
    manifest_json, data = _payload(0, 5, 512 << 10)
    with pytest.raises(OSError):
        store.install_sealed(0, 5, manifest_json, memoryview(data), source=Source.FETCHED)
    assert SlotState.WRITING not in _states(store, 0)
    assert store.list_steps(JOB, 0) == [1]
    assert not list(store.root.rglob("*.tmp")) and not list(store.root.rglob("*.source"))
    (small_tmpfs / "filler").unlink()
    assert _install(store, 0, 5, Source.FETCHED).exists()
    assert store.list_steps(JOB, 0) == [1, 5]


# ---- prefaulting: a segment being touched is nobody else's ------------------------------------


class _DuringFill(SegmentStore):
    """The real store; `during(slot)` runs once, just before the real prefault, in the first thread
    whose name starts with `thread` that prefaults (not in the Begins the hook itself makes)."""

    during: object = None
    thread = "MainThread"

    def _fill(self, rank: int, slot: Slot) -> None:
        hook = self.during
        if hook is not None and threading.current_thread().name.startswith(self.thread):
            self.during = None
            hook(slot)  # type: ignore[operator]
        super()._fill(rank, slot)


def test_a_begin_superseded_while_prefaulting_is_refused_and_its_segment_freed(tmp_path):
    store = _DuringFill(_config(tmp_path, keep=2), DaemonMetrics())
    store.adopt()
    seen: dict = {}

    def during(slot: Slot) -> None:
        seen["state"], seen["path"] = slot.state, slot.path
        seen["newer"] = _in_thread(lambda: store.begin(JOB, 0, 2, 1000))  # e.g. a client that retried
        seen["discard"] = _in_thread(lambda: store.discard_all(JOB))  # gives free segments back, not this one

    store.during = during
    with pytest.raises(RequestRejected, match="superseded"):
        store.begin(JOB, 0, 1, 1000)
    assert seen["state"] is SlotState.PREFAULTING
    newer = seen["newer"]["value"]
    assert newer.path != str(seen["path"]), "a segment being prefaulted was handed out"
    assert seen["discard"] == {"value": []} and seen["path"].exists()
    assert _states(store, 0) == [SlotState.FREE, SlotState.WRITING]
    assert _metric(store, "ftd_snapshots_aborted_total", {"reason": "superseded"}) == 1
    assert store.commit(JOB, 0, 2, newer.lease, _manifest(2, newer.path).to_json()) == [2]


def test_a_background_prefault_is_not_handed_out_until_it_is_done(tmp_path):
    store = _DuringFill(_config(tmp_path, keep=2, preallocate=True), DaemonMetrics())
    store.adopt()
    store.thread = "ftd-prealloc-"
    seen: dict = {}
    done = threading.Event()
    first: list = []
    begun = threading.Event()  # the first Begin has returned its lease

    def during(slot: Slot) -> None:
        seen["state"], seen["path"] = slot.state, slot.path
        with store._lock:
            seen["inflight"] = store._inflight()
        assert begun.wait(WAIT)
        lease = first[0]
        seen["commit"] = _in_thread(lambda: store.commit(JOB, 0, 1, lease.lease, _manifest(1, lease.path).to_json()))
        seen["begin"] = _in_thread(lambda: store.begin(JOB, 0, 2, 1000))
        done.set()

    store.during = during
    first.append(store.begin(JOB, 0, 1, 1000))  # its own prefault; then ftd-prealloc-0 prepares two more
    begun.set()
    assert done.wait(WAIT), "the background thread never prefaulted a segment"
    assert seen["state"] is SlotState.PREFAULTING and seen["inflight"] >= first[0].capacity
    assert seen["commit"] == {"value": [1]}
    assert seen["begin"]["value"].path not in (str(seen["path"]), first[0].path)
