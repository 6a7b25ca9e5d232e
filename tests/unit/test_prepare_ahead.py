"""Segments prepared ahead of a rank's first snapshot (Hello's expected_bytes), the estimate of the
state's size that a Snapshotter announces, and the steady-state number of segments per rank.
Real stores and daemons, real shared-memory files, real torch optimizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ftd.client import expected
from ftd.client.state import capture
from ftd.daemon.slots import SlotState
from ftd.manifest import layout
from tests.unit import snapkit
from ftd.daemon.store import SEGMENT_ROUNDING
from ftd.manifest import align_up
from tests.unit.storekit import JOB as STORE_JOB
from tests.unit.storekit import MiB, _metric, _snapshot, _store

JOB = "unit-prepare"  # the job of the in-process daemon (conftest's socket_path)


def _segs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.seg"))


def _faulted(path: Path) -> bool:
    st = os.stat(path)
    return st.st_blocks * 512 >= st.st_size


# ---- the store ----------------------------------------------------------------------------


def test_prepare_makes_the_rank_s_segments_before_its_first_begin(tmp_path):
    store = _store(tmp_path, keep=2)
    ready, more = store.prepare(STORE_JOB, 0, 3 * MiB + 1, at_most=1)
    assert len(ready) == 1 and more, "one segment per call when asked, and more to come"
    ready, more = store.prepare(STORE_JOB, 0, 3 * MiB + 1)
    segs = _segs(store.root)
    assert not more
    assert len(ready) == len(segs) == 2, "keep 2: two segments, one per step held"
    assert {p for p, _ in ready} == {str(p) for p in segs}
    assert all(c == 4 * MiB for _, c in ready) and all(_faulted(p) for p in segs), "allocated and pre-faulted"
    assert _metric(store, "ftd_segments_prepared_total") == 2
    assert store.prepare(STORE_JOB, 0, 3 * MiB) == (ready, False), "another announcement prepares nothing more"
    lease = store.begin(STORE_JOB, 0, 1, 3 * MiB)
    assert lease.path in dict(ready) and lease.capacity == 4 * MiB, "the first Begin takes a prepared segment"
    store.abort(STORE_JOB, 0, 1, lease.lease, "test")
    for step in range(1, 7):
        _snapshot(store, step, nbytes=3 * MiB)
    assert {str(p) for p in _segs(store.root)} == set(dict(ready)), "steady state: the same two segments"
    assert _metric(store, "ftd_segments_prepared_total") == 2


def test_prepare_gives_back_a_too_small_free_segment_and_counts_sealed_ones(tmp_path):
    store = _store(tmp_path, keep=2, spare_segment=True)
    for step in (1, 2, 3):
        _snapshot(store, step)  # 1 MiB segments: two sealed, one free
    ready, _ = store.prepare(STORE_JOB, 0, 2 * MiB)
    assert len(_segs(store.root)) == 5, "the free 1 MiB one replaced by three of 2 MiB beside the two sealed"
    assert len(ready) == 3 and all(c == 2 * MiB for _, c in ready)
    assert [s.state for s in store._slots[0]].count(SlotState.SEALED) == 2 and store.list_steps(STORE_JOB, 0) == [2, 3]


def test_prepare_stops_at_the_budget_without_failing(tmp_path):
    store = _store(tmp_path, keep=2, memory_budget=str(3 * MiB))
    ready, more = store.prepare(STORE_JOB, 0, 2 * MiB)
    assert len(ready) == 1 and not more, "one 2 MiB segment fits a 3 MiB budget, and no more will"
    assert _metric(store, "ftd_refused_snapshots_total", {"reason": "budget"}) == 0, "no snapshot was refused"
    _snapshot(store, 1, nbytes=2 * MiB)  # the prepared one is used


@pytest.mark.parametrize("keep, spare, segments", [(1, False, 2), (2, False, 2), (3, False, 3), (2, True, 3)])
def test_steady_state_segments_per_rank(tmp_path, keep, spare, segments):
    store = _store(tmp_path, keep=keep, spare_segment=spare)
    for step in range(1, 9):
        held = _snapshot(store, step)
        assert held == list(range(max(1, step - keep + 1), step + 1))
    assert len(_segs(store.root)) == segments and store.held_bytes() == segments * SEGMENT_ROUNDING


# ---- the estimate -------------------------------------------------------------------------


def _actual(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return layout(capture(1, model, opt, None, None).specs)[1]


def _train_one(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(2, 64)).sum().backward()
    opt.step()


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW(p, lr=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.Adagrad(p, lr=0.1),  # creates its state at construction: counted as it is
])
def test_the_estimate_covers_the_state_after_the_first_step(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 8))
    model[1].weight.requires_grad_(False)  # frozen: no optimizer state
    opt = make([p for p in model.parameters() if p.requires_grad])
    estimate = expected.expected_bytes(model, opt)
    _train_one(model, opt)
    actual = _actual(model, opt)
    assert estimate is not None and actual <= estimate <= actual + expected.MARGIN_BYTES, (estimate, actual)


def test_an_optimizer_of_unknown_state_announces_nothing():
    model = nn.Linear(8, 8)
    assert expected.expected_bytes(model, torch.optim.RMSprop(model.parameters())) is None
    assert expected.expected_bytes(model, None) == expected.MARGIN_BYTES + align_up(8 * 8 * 4) + align_up(8 * 4)


# ---- a Snapshotter against a real daemon ----------------------------------------------------


def test_a_snapshotter_has_its_segments_prepared_and_mapped_before_its_first_snapshot(socket_path, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snap = snapkit.snapshotter(socket_path, model, opt, job=JOB)
    try:
        assert snap.prepared is not None and snap.prepared.done.wait(snapkit.WAIT_S)
        assert snap.prepared.mapped == 2, "keep 2: both segments mapped ahead"
        status = snap.client.status()
        (rank,) = status.ranks
        assert not rank.sealed_steps and rank.held_bytes == status.held_bytes > 0
        prepared = {str(p) for p in _segs(tmp_path / "shm")}
        mapped = set(snap._engine.cache._open)
        assert mapped == prepared
        for step in range(1, 6):
            _train_one_large(model, opt)
            snapkit.snap(snap, step)
            assert {str(p) for p in _segs(tmp_path / "shm")} == prepared, "no segment beyond the prepared ones"
        assert set(snap._engine.cache._open) == prepared, "no mapping made after the prepared ones"
        assert snap.client.status().held_bytes == status.held_bytes
    finally:
        snap.close()


def _train_one_large(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_without_preallocation_nothing_is_prepared_and_snapshots_still_seal(tmp_path):
    from ftd.config import DaemonConfig
    from ftd.daemon.server import Daemon
    config = DaemonConfig.load(environ={}, job=JOB, socket=str(tmp_path / "p.sock"), shm_dir=str(tmp_path / "shm"),
                               memory_reserve="0", metrics_port=0, preallocate=False)
    daemon = Daemon(config).start()
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    snap = snapkit.snapshotter(config.socket, model, opt, job=JOB)
    try:
        assert snap.prepared.done.wait(snapkit.WAIT_S) and snap.prepared.mapped == 0 and not snap.prepared.failure
        assert not _segs(tmp_path / "shm")
        model(torch.randn(2, 64)).sum().backward()
        opt.step()
        snapkit.snap(snap, 1)
    finally:
        snap.close()
        daemon.stop(grace=0.5)


def test_an_unreachable_daemon_ends_the_preparation_quietly(tmp_path):
    model = nn.Linear(8, 8)
    snap = snapkit.snapshotter(str(tmp_path / "nobody.sock"), model, torch.optim.SGD(model.parameters(), lr=0.1),
                               job=JOB, rpc_timeout=1)
    try:
        assert snap.prepared.done.wait(snapkit.WAIT_S)
        assert snap.prepared.mapped == 0 and "DaemonUnavailable" in snap.prepared.failure
        snap.snapshot(1)  # never raises: skipped, counted
        assert snap.wait(snapkit.WAIT_S) and snap.stats.skip_reasons["daemon_unavailable"] == 1
        assert snap._engine.errors == 0
    finally:
        snap.close()
