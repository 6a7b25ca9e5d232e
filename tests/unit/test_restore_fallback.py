"""restore() never raises: a step that cannot be verified or applied falls back to the previous
one, then to step 0; an edited, too deep or amplifying manifest is refused; snapshot() never
raises; restore() waits for a daemon that is not up yet. Real daemons, real shm files, real models."""

from __future__ import annotations

import functools

import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ftd
from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from ftd.manifest import DIGEST_KEY, manifest_digest
from tests.bitexact import same_bytes
from tests.unit import snapkit


JOB = "unit-fallback"
WAIT_S = 30.0


@pytest.fixture(autouse=True)
def _isolated_globals():
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    level = logging.getLogger("ftd").level
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        logging.getLogger("ftd").setLevel(level)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


_snapshotter = functools.partial(snapkit.snapshotter, job=JOB)
_snap = snapkit.snap


def _bytes(model: nn.Module) -> list[bytes]:
    return [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for t in model.state_dict().values()]


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()


def _manifest_file(shm: Path, step: int) -> Path:
    for path in shm.glob(f"ftd-{JOB}*/rank-0/*.manifest.json"):
        if json.loads(path.read_bytes())["step"] == step:
            return path
    raise AssertionError(f"no manifest of step {step} under {shm}")


def _rewrite(path: Path, edit, reseal: bool) -> None:
    doc = json.loads(path.read_bytes())
    edit(doc)
    if reseal:
        doc.pop(DIGEST_KEY)
        doc[DIGEST_KEY] = manifest_digest(doc)
    path.write_text(json.dumps(doc))


def _two_steps(socket_path: str, model: nn.Module) -> list[bytes]:
    """Seal steps 1 and 2 (Adam, one group); return the model's bytes at step 1."""
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with _snapshotter(socket_path, model, opt) as snap:
        _train_step(model, opt)
        _snap(snap, 1)
        at_1 = _bytes(model)
        _train_step(model, opt)
        _snap(snap, 2)
    return at_1


# ---- item 11: apply failures fall back ------------------------------------------------------------


def test_other_param_groups_fall_back_to_the_previous_step_then_to_zero(socket_path):
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with _snapshotter(socket_path, model, opt) as snap:
        _train_step(model, opt)
        _snap(snap, 1)
    at_1 = _bytes(model)
    split = torch.optim.Adam([{"params": list(model[0].parameters())}, {"params": list(model[1].parameters())}])
    with _snapshotter(socket_path, model, split) as snap:
        _train_step(model, split)
        _snap(snap, 2)

    fresh = _model(1)
    one_group = torch.optim.Adam(fresh.parameters(), lr=0.5)
    with _snapshotter(socket_path, fresh, one_group) as snap:
        assert snap.restore() == 1
        assert _bytes(fresh) == at_1
        assert one_group.param_groups[0]["lr"] == 0.1
        assert any("step 2" in f and "parameter groups" in f for f in snap.stats.restore_failures)
        assert snap.stats.restore_partial_step is None

    other = _model(1)
    three = torch.optim.SGD([{"params": [other[0].weight]}, {"params": [other[0].bias, other[1].weight]},
                             {"params": [other[1].bias]}], lr=0.01)
    before = _bytes(other)
    with _snapshotter(socket_path, other, three) as snap:
        assert snap.restore() == 0  # step 1 (step 2 was discarded by the restore above) does not fit
        assert len(snap.stats.restore_failures) == 1
        assert snap.stats.restore_partial_step is None
        assert _bytes(other) == before  # the checks ran before anything was written


class _Scheduler:
    """A user scheduler whose saved state can make load_state_dict fail (after the model is written)."""

    def __init__(self) -> None:
        self.boom = False
        self.value = 0

    def state_dict(self) -> dict:
        return {"boom": self.boom, "value": self.value}

    def load_state_dict(self, sd: dict) -> None:
        if sd["boom"]:
            raise KeyError("scheduler state from another version")
        self.boom, self.value = sd["boom"], sd["value"]


def test_apply_failing_half_way_falls_back_and_the_previous_step_overwrites_everything(socket_path):
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = _Scheduler()
    with _snapshotter(socket_path, model, opt, scheduler=sched) as snap:
        _train_step(model, opt)
        sched.value = 1
        _snap(snap, 1)
        at_1 = _bytes(model)
        state_1 = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
        _train_step(model, opt)
        sched.boom, sched.value = True, 2
        _snap(snap, 2)

    fresh, fresh_sched = _model(1), _Scheduler()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    with _snapshotter(socket_path, fresh, fresh_opt, scheduler=fresh_sched) as snap:
        assert snap.restore() == 1  # step 2's apply wrote the model and optimizer, then failed
        assert _bytes(fresh) == at_1
        for key, value in fresh_opt.state_dict()["state"][0].items():
            assert same_bytes(value, state_1[key]), key
        assert fresh_sched.value == 1
        assert snap.stats.restore_partial_step is None


def test_no_step_applies_gives_step_zero_and_reports_the_partial_apply(socket_path):
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = _Scheduler()
    sched.boom = True
    with _snapshotter(socket_path, model, opt, scheduler=sched) as snap:
        _train_step(model, opt)
        _snap(snap, 1)
        _train_step(model, opt)
        _snap(snap, 2)
    fresh = _model(1)
    with _snapshotter(socket_path, fresh, torch.optim.Adam(fresh.parameters()), scheduler=_Scheduler()) as snap:
        assert snap.restore() == 0
        assert snap.stats.restore_partial_step == 1  # the last one tried; the live objects hold part of it
        assert sum("apply failed" in f for f in snap.stats.restore_failures) == 2


# ---- item 12: the whole manifest is checked, parses are bounded ------------------------------------


def _edit_lr(doc: dict) -> None:
    doc["meta"]["optim"]["param_groups"][0]["lr"] = 1000.0


def _deep(doc: dict) -> None:
    value: list = []
    for _ in range(600):
        value = [value]
    doc["meta"]["deep"] = value


def _amplify(doc: dict) -> None:
    doc["meta"]["many"] = [{"__tensor__": "model/0.weight"}] * 300


@pytest.mark.parametrize(("edit", "reseal", "why"), [
    (_edit_lr, False, "manifest checksum mismatch"),
    (_deep, True, "nested deeper than 64"),
    (_amplify, True, "more than once"),
], ids=["edited-lr", "600-deep", "300x-reference"])
def test_bad_manifest_on_disk_is_refused_and_the_previous_step_restored(socket_path, tmp_path, edit, reseal, why):
    at_1 = _two_steps(socket_path, _model(0))
    path = _manifest_file(tmp_path / "shm", 2)
    _rewrite(path, edit, reseal)
    fresh = _model(1)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    with _snapshotter(socket_path, fresh, opt) as snap:
        assert snap.restore() == 1
        assert _bytes(fresh) == at_1
        assert opt.param_groups[0]["lr"] == 0.1
        assert any(why in f for f in snap.stats.restore_failures), snap.stats.restore_failures


def test_a_300x_reference_decodes_no_tensor(socket_path, tmp_path):
    """The amplifying manifest is refused before any tensor is decoded out of it."""
    from ftd.client import restore as restore_mod

    _two_steps(socket_path, _model(0))
    _rewrite(_manifest_file(tmp_path / "shm", 2), _amplify, reseal=True)
    client = ftd.Snapshotter(_model(0), rank=0, world_size=1, job=JOB, socket=socket_path).client
    reply = client.open(2)
    with pytest.raises(ftd.errors.ManifestError, match="more than once"):
        restore_mod.Manifest.from_json(reply.manifest_json)


# ---- item 13: snapshot() never raises ---------------------------------------------------------------


def test_snapshot_survives_a_raising_extra_callable_and_deep_extra(socket_path):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"n": 0}

    def extra():
        calls["n"] += 1
        if calls["n"] <= 2:
            raise KeyError("epoch")
        if calls["n"] == 3:
            deep: dict = {}
            for _ in range(5000):
                deep = {"d": deep}
            return {"deep": deep}
        if calls["n"] == 4:
            cycle: list = []
            cycle.append(cycle)
            return {"cycle": cycle}
        return {"epoch": 3}

    with _snapshotter(socket_path, model, opt, extra=extra) as snap:
        for step in range(1, 5):
            snap.snapshot(step)  # must not raise
            _train_step(model, opt)  # the pre-hook runs too
        assert snap.wait(WAIT_S)
        assert snap.stats.skip_reasons["extra"] == 2
        assert snap.stats.skip_reasons["capture"] == 2
        assert snap.stats.skipped == 4 and snap.stats.sealed == 0
        _snap(snap, 5)
        assert snap.client.list_steps() == [5]


# ---- item 15: restore() waits for a daemon that is not up yet ---------------------------------------


def _daemon_config(tmp_path: Path) -> DaemonConfig:
    return DaemonConfig.load(environ={}, job=JOB, socket=str(tmp_path / "late.sock"),
                             shm_dir=str(tmp_path / "late-shm"), memory_reserve="0", metrics_port=0)


def test_restore_waits_for_a_restarting_daemon_and_resumes(tmp_path):
    config = _daemon_config(tmp_path)
    model = _model(0)
    daemon = Daemon(config).start()
    try:
        at_1 = _two_steps(config.socket, model)
    finally:
        daemon.stop(grace=0.5)
    at_2 = _bytes(model)

    started: list[Daemon] = []

    def start_late() -> None:
        time.sleep(2.0)
        started.append(Daemon(config).start())

    thread = threading.Thread(target=start_late, name="late-daemon")
    thread.start()
    try:
        fresh = _model(1)
        with _snapshotter(config.socket, fresh, torch.optim.Adam(fresh.parameters()), daemon_wait=60) as snap:
            assert snap.restore() == 2
            assert _bytes(fresh) == at_2 != at_1
    finally:
        thread.join()
        for d in started:
            d.stop(grace=0.5)


def test_restore_without_a_daemon_starts_fresh_after_daemon_wait(tmp_path):
    config = _daemon_config(tmp_path)
    fresh = _model(1)
    for wait in (0, 1):
        with _snapshotter(config.socket, fresh, torch.optim.Adam(fresh.parameters()), daemon_wait=wait) as snap:
            assert snap.restore() == 0
            assert snap.stats.restore_failures


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_daemon_wait_is_a_config_error(tmp_path, bad):
    with pytest.raises(ftd.errors.ConfigError, match="daemon_wait"):
        _snapshotter(str(tmp_path / "none.sock"), _model(0), daemon_wait=bad)


# ---- ranks agree on the apply, too ------------------------------------------------------------------


def _rank_main(rank: int, socket_path: str, pg_file: str, out: str) -> None:
    """One of two gloo ranks: seal steps 1 and 2, then restore; rank 1 cannot apply step 2."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)
    try:
        model = _model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = _Scheduler()
        with ftd.Snapshotter(model, opt, scheduler=sched, rank=rank, world_size=2, job=JOB,
                             socket=socket_path) as snap:
            for step in (1, 2):
                _train_step(model, opt)
                sched.boom = rank == 1 and step == 2
                _snap(snap, step)
                if step == 1:
                    at_1 = _bytes(model)
        dist.barrier()
        fresh = _model(1)
        with ftd.Snapshotter(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), scheduler=_Scheduler(),
                             rank=rank, world_size=2, job=JOB, socket=socket_path) as snap:
            step = snap.restore()
            result = {"step": step, "model_is_step_1": _bytes(fresh) == at_1}
        Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_an_apply_failing_on_one_rank_makes_every_rank_fall_back(socket_path, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(r, socket_path, str(tmp_path / "pg"), str(outs[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    assert results == [{"step": 1, "model_is_step_1": True}] * 2
