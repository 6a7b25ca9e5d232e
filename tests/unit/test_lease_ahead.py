"""One RPC per snapshot (issue 15 §1): a Commit can lease the segment of the rank's next snapshot, which then
needs no Begin. Only a segment the next Begin would take as it is (free: keep=1 or a spare segment) is leased;
the held steps stay as `keep` says; a Begin, an Abort, a gone client or a restarted daemon end the lease."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ftd.client.rpc import DaemonClient
from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from ftd.errors import RequestRejected
from ftd.manifest import layout
from tests.unit import snapkit
from tests.unit.storekit import JOB, _manifest, _metric, _segs, _specs, _store

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds here: nothing is leased ahead")


def _total(step: int) -> int:
    return layout(_specs(step))[1]


def _commit(store, step: int, lease) -> list[int]:
    return store.commit(JOB, 0, step, lease.lease, _manifest(step, lease.path).to_json())


# ---- the store ----------------------------------------------------------------------------------


def test_a_free_segment_is_leased_and_its_commit_names_the_step(tmp_path):
    store = _store(tmp_path, keep="1")
    first = store.begin(JOB, 0, 1, _total(1))
    _commit(store, 1, first)
    second = store.begin(JOB, 0, 2, _total(2))
    assert _commit(store, 2, second) == [2]  # step 1's segment is free now
    ahead = store.lease_next(JOB, 0, _total(3))
    assert ahead is not None and ahead.path == first.path
    assert not store.summary()[0].writing  # nothing is being written yet
    assert store.list_steps(JOB, 0) == [2]
    assert _commit(store, 3, ahead) == [3]
    assert store.open(JOB, 0, 3)[0] == first.path
    assert _metric(store, "ftd_commit_latency_seconds_count") == 2  # only Begun steps measure it


@pytest.mark.parametrize("keep, spare, leased", [("2", "0", False), ("2", "1", True), ("1", "0", True)])
def test_nothing_is_evicted_for_a_lease(tmp_path, keep, spare, leased):
    store = _store(tmp_path, keep=keep, spare_segment=spare)
    for step in range(1, 5):
        _commit(store, step, store.lease_next(JOB, 0, _total(step)) or store.begin(JOB, 0, step, _total(step)))
    held = store.list_steps(JOB, 0)
    assert (store.lease_next(JOB, 0, _total(5)) is not None) is leased
    assert store.list_steps(JOB, 0) == held == list(range(5 - int(keep), 5))


def test_a_lease_needs_room_and_one_writer(tmp_path):
    store = _store(tmp_path, keep="1")
    for step in (1, 2):
        _commit(store, step, store.begin(JOB, 0, step, _total(step)))
    assert store.lease_next(JOB, 0, 64 << 20) is None  # larger than the free segment: the next Begin grows one
    assert store.lease_next(JOB, 0, 0) is None
    assert store.lease_next(JOB, 0, _total(3)) is not None
    assert store.lease_next(JOB, 0, _total(3)) is None  # one lease out at a time


def test_a_begin_gives_the_lease_up_quietly(tmp_path):
    store = _store(tmp_path, keep="1")
    for step in (1, 2):
        _commit(store, step, store.begin(JOB, 0, step, _total(step)))
    ahead = store.lease_next(JOB, 0, _total(3))
    begun = store.begin(JOB, 0, 3, _total(3))
    assert begun.path == ahead.path and begun.lease != ahead.lease
    with pytest.raises(RequestRejected, match="no lease"):
        _commit(store, 3, ahead)
    assert _commit(store, 3, begun) == [3]
    assert _metric(store, "ftd_snapshots_aborted_total", {"reason": "superseded"}) == 0
    assert len(_segs(store)) == 2


def test_an_aborted_lease_frees_its_segment(tmp_path):
    store = _store(tmp_path, keep="1")
    for step in (1, 2):
        _commit(store, step, store.begin(JOB, 0, step, _total(step)))
    ahead = store.lease_next(JOB, 0, _total(3))
    store.abort(JOB, 0, 3, ahead.lease, "copy abandoned")
    with pytest.raises(RequestRejected):
        _commit(store, 3, ahead)
    again = store.lease_next(JOB, 0, _total(3))
    assert again is not None and again.lease != ahead.lease


def test_a_lease_outlives_lease_timeout_but_not_its_client(tmp_path):
    store = _store(tmp_path, keep="1", lease_timeout="0.01")
    for step in (1, 2):
        _commit(store, step, store.begin(JOB, 0, step, _total(step)))
    ahead = store.lease_next(JOB, 0, _total(3))
    store._reaped_at = 0.0
    store.held_bytes()  # reaps: the lease is older than lease_timeout, and its client unknown (alive)
    assert _commit(store, 3, ahead) == [3]
    ahead = store.lease_next(JOB, 0, _total(4))
    client = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert store.note_client(0, client.pid)  # the rank's process...
    finally:
        client.kill()
        client.wait()
    store.held_bytes()  # ...is gone: its lease ends, its segment goes
    assert not os.path.exists(ahead.path)
    with pytest.raises(RequestRejected):
        store.commit(JOB, 0, 4, ahead.lease, _manifest(4).to_json())


# ---- a Snapshotter on a real daemon -------------------------------------------------------------


@pytest.fixture
def keep_one(tmp_path):
    config = DaemonConfig.load(environ={}, job=JOB, socket=str(tmp_path / "s.sock"), shm_dir=str(tmp_path / "shm"),
                               memory_reserve="0", keep="1", metrics_port="0")
    daemon = Daemon(config).start()
    try:
        yield config.socket, daemon
    finally:
        daemon.stop(grace=0.5)


def _counting_begins(monkeypatch) -> list[int]:
    begun: list[int] = []
    real = DaemonClient.begin

    def begin(self, step, nbytes):
        begun.append(step)
        return real(self, step, nbytes)

    monkeypatch.setattr(DaemonClient, "begin", begin)
    return begun


def _train(model, opt) -> None:
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_snapshots_take_one_rpc_and_restore_bit_exact(keep_one, monkeypatch):
    socket, _ = keep_one
    begun = _counting_begins(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    snap = snapkit.snapshotter(socket, model, opt, job=JOB)
    # both segments prepared ahead first: otherwise the second round's Hello may come after step 1's Commit,
    # which then had no free segment to lease, and step 2 Begins (timing, not what is tested here)
    assert snap.prepared is not None and snap.prepared.done.wait(10)
    try:
        for step in range(1, 7):
            _train(model, opt)
            snapkit.snap(snap, step)
        model.register_buffer("grown", torch.arange(float(1 << 20)))  # the state outgrows the leased segment
        for step in (7, 8, 9, 10):
            snapkit.snap(snap, step)
    finally:
        snap.close()
    # 7 Begins a bigger segment; 8 too (only step 6's small one was free); from 9 on, one RPC again
    assert begun == [1, 7, 8], begun
    model2 = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))
    model2.register_buffer("grown", torch.zeros(1 << 20))
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    _train(model2, opt2)
    snapkit.restore_and_compare(socket, model, model2, opt2, job=JOB, step=10)


def test_a_daemon_restarted_in_this_process_is_not_written_through_an_old_lease(keep_one, tmp_path, monkeypatch):
    """A daemon in this process restarts with the same pid, so the lease looks alive; but the restarted daemon
    dropped the segment it named (never sealed): the snapshot Begins instead, before it copies anything."""
    socket, daemon = keep_one
    model = nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    snap = snapkit.snapshotter(socket, model, opt, job=JOB)
    try:
        for step in (1, 2, 3):
            _train(model, opt)
            snapkit.snap(snap, step)
        daemon.stop(grace=0.5)
        config = DaemonConfig.load(environ={}, job=JOB, socket=socket, shm_dir=str(tmp_path / "shm"),
                                   memory_reserve="0", keep="1", metrics_port="0")
        again = Daemon(config).start()
        try:
            begun = _counting_begins(monkeypatch)
            for step in (4, 5, 6):
                _train(model, opt)
                snapkit.snap(snap, step)  # each one sealed
            assert begun == [4], begun
            assert snap.stats.skipped == 0, dict(snap.stats.skip_reasons)
        finally:
            again.stop(grace=0.5)
    finally:
        snap.close()


def test_same_daemon_follows_the_verified_process(keep_one):
    socket, _ = keep_one
    client = DaemonClient(socket, JOB, 0, 5.0)
    try:
        assert not client.same_daemon()  # nothing verified yet
        client.status()
        assert client.same_daemon()
        dead = os.fork()
        if dead == 0:
            os._exit(0)
        os.waitpid(dead, 0)
        client._watch.follow(dead)  # what a daemon that has exited looks like
        assert not client.same_daemon()
    finally:
        client.close()


def test_a_killed_daemon_process_leaves_no_lease_behind(tmp_path, monkeypatch):
    """The daemon process is SIGKILLed and started again: the lease its last Commit gave is not used (its
    process is gone), so the next snapshot Begins on the new daemon and is sealed, not refused."""
    import signal

    from ftd.demo.procs import DaemonProcess, ftd_env

    env = ftd_env(tmp_path, JOB, FTD_KEEP="1")
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    model = nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    snap = snapkit.snapshotter(env["FTD_SOCKET"], model, opt, job=JOB)
    try:
        for step in (1, 2, 3):
            _train(model, opt)
            snapkit.snap(snap, step)
        daemon.kill(signal.SIGKILL)
        daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
        begun = _counting_begins(monkeypatch)
        for step in (4, 5, 6):
            _train(model, opt)
            snapkit.snap(snap, step)  # each one sealed
        assert begun == [4], begun
    finally:
        snap.close()
        daemon.kill(signal.SIGTERM)
