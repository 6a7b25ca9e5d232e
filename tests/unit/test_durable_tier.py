"""The durable tier on one node: a real daemon persists cadence steps from shared memory, a fresh daemon
with empty memory restores them bit for bit, stock torch.distributed.checkpoint reads the files, and a
corrupted or unfinished step is never used."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

import ftd
from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from ftd.durable import layout, reader
from ftd.durable.reader import DurableCorrupt, DurableStep
from tests.bitexact import byte_view
from tests.unit.snapkit import snap, snapshotter

JOB = "durable-unit"
WAIT_S = 30.0


def _daemon(tmp_path: Path, **settings) -> Daemon:
    config = DaemonConfig.load(environ={}, job=JOB, socket=str(tmp_path / "s.sock"), shm_dir=str(tmp_path / "shm"),
                               memory_reserve="0", metrics_port=0, durable_dir=str(tmp_path / "durable"),
                               **settings)
    return Daemon(config).start()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(step)
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _wait_durable(root: Path, step: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while step not in reader.committed_steps(root):
        assert time.monotonic() < deadline, f"step {step} never became durable: {reader.committed_steps(root)}"
        time.sleep(0.05)


def _bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[bytes]:
    out = [byte_view(t).numpy().tobytes() for t in model.state_dict().values()]
    for state in opt.state_dict()["state"].values():
        out += [byte_view(v).numpy().tobytes() for _, v in sorted(state.items())]
    return out


def _persist_steps(tmp_path: Path, steps: int, every: int = 2):
    """Train `steps` steps with a snapshot each; return the model, optimizer and the job's durable root."""
    daemon = _daemon(tmp_path, durable_every=every, durable_keep=3)
    model, opt = _model()
    root = layout.job_dir(tmp_path / "durable", JOB)
    try:
        with snapshotter(daemon.config.socket, model, opt, job=JOB) as s:
            for step in range(1, steps + 1):
                _train(model, opt, step)
                snap(s, step)
        _wait_durable(root, steps - steps % every)
    finally:
        daemon.stop(grace=0.5)
    return model, opt, root


def _restore_with_memory_wiped(tmp_path: Path):
    """Wipe the shm, start a fresh daemon on the same durable directory and restore a fresh model:
    (restored step, the Snapshotter's stats, model, optimizer)."""
    shutil.rmtree(tmp_path / "shm")
    daemon = _daemon(tmp_path, durable_every=2)
    try:
        fresh, fresh_opt = _model()
        with snapshotter(daemon.config.socket, fresh, fresh_opt, job=JOB) as s:
            step = s.restore()
        return step, s.stats, fresh, fresh_opt
    finally:
        daemon.stop(grace=0.5)


def test_a_fresh_daemon_restores_the_newest_durable_step_bit_for_bit(tmp_path):
    model, opt, root = _persist_steps(tmp_path, 4)
    assert reader.committed_steps(root) == [2, 4]
    step, stats, fresh, fresh_opt = _restore_with_memory_wiped(tmp_path)
    assert step == 4 and stats.restore_source == "durable"
    assert _bytes(fresh, fresh_opt) == _bytes(model, opt)


def test_stock_dcp_reads_the_durable_step(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    assert safetensors
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt, root = _persist_steps(tmp_path, 2)
    fresh, fresh_opt = _model()
    _train(fresh, fresh_opt, 99)  # an optimizer with state to load into
    msd, osd = get_model_state_dict(fresh), get_optimizer_state_dict(fresh, fresh_opt)
    dcp.load({"model": msd, "optim": {"state": osd["state"]}},
             storage_reader=dcp.HuggingFaceStorageReader(str(layout.step_dir(root.parent, JOB, 2))))
    want_m, want_o = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    for name, tensor in want_m.items():
        assert byte_view(msd[name]).numpy().tobytes() == byte_view(tensor).numpy().tobytes(), name
    for fqn, state in want_o["state"].items():
        for key, tensor in state.items():
            assert byte_view(osd["state"][fqn][key]).numpy().tobytes() == byte_view(tensor).numpy().tobytes(), (fqn, key)


def test_a_corrupted_file_is_detected_and_the_previous_durable_step_is_used(tmp_path):
    model, opt, root = _persist_steps(tmp_path, 4)
    st = layout.step_dir(root.parent, JOB, 4) / layout.tensors_file(0)
    data = bytearray(st.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor
    st.write_bytes(bytes(data))
    with pytest.raises(DurableCorrupt, match="checksum mismatch"):
        DurableStep.open(root, 4).segment(0)
    step, stats, _, _ = _restore_with_memory_wiped(tmp_path)
    assert step == 2 and stats.restore_source == "durable" and 4 in stats.restore_unusable


def test_an_unfinished_step_is_ignored_and_removed_once_a_newer_one_commits(tmp_path):
    root = layout.job_dir(tmp_path / "durable", JOB)
    partial = layout.step_dir(tmp_path / "durable", JOB, 2)
    partial.mkdir(parents=True)
    (partial / layout.tensors_file(0)).write_bytes(b"\0" * 100)  # a daemon died mid-write
    assert reader.committed_steps(root) == []
    _persist_steps(tmp_path, 4, every=4)
    assert reader.committed_steps(root) == [4]
    assert not partial.exists()


def test_a_step_of_another_world_size_is_resharded_through_dcp(tmp_path):
    """Two ranks of a world of 2 persist step 2 (each its full copy: no process group here); a world of one
    with empty memory restores it through DCP's planner from the durable tier, every byte equal."""
    daemon = _daemon(tmp_path, durable_every=2)
    root = layout.job_dir(tmp_path / "durable", JOB)
    model, opt = _model()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    extras = [{"position": 0}, {"position": 0}]
    try:
        snaps = [ftd.Snapshotter(model, opt, scheduler=sched, extra=extras[r], rank=r, world_size=2, job=JOB,
                                 socket=daemon.config.socket) for r in range(2)]
        for step in (1, 2):
            _train(model, opt, step)
            sched.step()
            for r, s in enumerate(snaps):
                extras[r]["position"] = 10 * step + r
                snap(s, step)
        _wait_durable(root, 2)
        rng = torch.get_rng_state()
        for s in snaps:
            s.close()
    finally:
        daemon.stop(grace=0.5)
    assert DurableStep.open(root, 2).index.world_size == 2
    shutil.rmtree(tmp_path / "shm")
    daemon = _daemon(tmp_path, durable_every=2)
    try:
        fresh, fresh_opt = _model()
        fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1, gamma=0.5)
        extra = {"position": -1}
        torch.manual_seed(1234)
        with snapshotter(daemon.config.socket, fresh, fresh_opt, job=JOB, scheduler=fresh_sched, extra=extra,
                         durable_dir=str(tmp_path / "durable")) as s:
            assert s.restore() == 2
            assert s.stats.restore_source == "durable" and s.stats.restore_resharded
        assert _bytes(fresh, fresh_opt) == _bytes(model, opt)
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and fresh_sched.last_epoch == 2
        assert extra == {"position": 20}  # old rank 0's
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        daemon.stop(grace=0.5)


def test_the_seconds_cadence_is_agreed_through_the_directory(tmp_path):
    """Two daemons (a rank each, world 2) with only a time cadence: a step one of them proposes is written by
    both and commits, while training goes on."""
    daemons = [Daemon(DaemonConfig.load(
        environ={}, job=JOB, node=f"n{i}", socket=str(tmp_path / f"s{i}.sock"), shm_dir=str(tmp_path / f"shm{i}"),
        memory_reserve="0", metrics_port=0, durable_dir=str(tmp_path / "durable"), durable_every=0,
        durable_every_seconds=0.5)).start() for i in range(2)]
    root = layout.job_dir(tmp_path / "durable", JOB)
    model, opt = _model()
    try:
        snaps = [ftd.Snapshotter(model, opt, rank=r, world_size=2, job=JOB, socket=d.config.socket)
                 for r, d in enumerate(daemons)]
        step = 0
        deadline = time.monotonic() + WAIT_S
        while not reader.committed_steps(root):
            assert time.monotonic() < deadline, "no time-cadence step was committed"
            step += 1
            _train(model, opt, step)
            for s in snaps:
                snap(s, step)
            time.sleep(0.02)
        committed = reader.committed_steps(root)[0]
        assert 0 < committed <= step + 100
        assert DurableStep.open(root, committed).index.world_size == 2
        for r in range(2):
            manifest_json, _ = DurableStep.open(root, committed).segment(r)
            assert f'"rank":{r}'.encode() in manifest_json
        for s in snaps:
            s.close()
    finally:
        for d in daemons:
            d.stop(grace=0.5)


@pytest.mark.parametrize("settings, message", [
    ({"durable_every": 0}, "needs a cadence"),
    ({"durable_every": -1}, "must be >= 0"),
    ({"durable_every_seconds": float("nan")}, "must be >= 0"),
    ({"durable_keep": 0}, "durable_keep >= 1"),
])
def test_durable_settings_are_checked(tmp_path, settings, message):
    from ftd.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        DaemonConfig.load(environ={}, job=JOB, durable_dir=str(tmp_path), **settings)


def test_a_step_being_written_stays_pinned_while_newer_steps_seal(tmp_path):
    """keep=1 and a slow disk: steps 3..6 seal (and step 4 is wanted) while step 2 is still being written; its
    segment must not be evicted and reused under the writer, so the committed step verifies."""
    daemon = _daemon(tmp_path, keep=1, durable_every=2, durable_bandwidth="4M", preallocate="0")
    root = layout.job_dir(tmp_path / "durable", JOB)
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 2048)  # 4 MiB of parameters: about a second per durable step
    try:
        with snapshotter(daemon.config.socket, model, job=JOB) as s:
            for step in range(1, 7):
                with torch.no_grad():
                    model.weight.add_(1.0)
                snap(s, step)
        _wait_durable(root, 2)
        manifest_json, data = DurableStep.open(root, 2).segment(0)  # raises on any byte of another step
        assert b'"step":2' in manifest_json and len(data) >= 4 << 20
    finally:
        daemon.stop(grace=0.5)


def test_an_unusable_durable_directory_is_a_clear_start_up_error(tmp_path):
    from ftd.errors import ConfigError

    (tmp_path / "file").write_text("")
    config = DaemonConfig.load(environ={}, job=JOB, socket=str(tmp_path / "s.sock"), shm_dir=str(tmp_path / "shm"),
                               memory_reserve="0", metrics_port=0, durable_dir=str(tmp_path / "file" / "sub"))
    with pytest.raises(ConfigError, match="cannot create the durable directory .*Not a directory"):
        Daemon(config).start()
    assert not (tmp_path / "s.sock").exists()  # nothing left serving
