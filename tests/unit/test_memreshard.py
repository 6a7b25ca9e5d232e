"""Resharding from memory, trainer side (ftd.client.memreshard) on one real daemon: two ranks of a world of
2 seal steps; a world of one restores the newest from shared memory through DCP's planner, every byte
equal, per-rank state by the documented rule (or the script's hook), a corrupt segment refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ftd
from ftd.client.rpc import DaemonClient
from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from ftd.manifest import Manifest
from tests.bitexact import byte_view
from tests.unit.snapkit import snap, snapshotter

JOB = "memreshard-unit"
pytestmark = pytest.mark.timeout(120)


def _daemon(tmp_path: Path) -> Daemon:
    config = DaemonConfig.load(environ={}, job=JOB, socket=str(tmp_path / "s.sock"), shm_dir=str(tmp_path / "shm"),
                               memory_reserve="0", metrics_port=0, keep=3)
    return Daemon(config).start()


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(step)
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[bytes]:
    out = [byte_view(t).numpy().tobytes() for t in model.state_dict().values()]
    for state in opt.state_dict()["state"].values():
        out += [byte_view(v).numpy().tobytes() for _, v in sorted(state.items())]
    return out


def _world_of_two(daemon: Daemon, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[dict], bytes]:
    """Ranks 0 and 1 of a world of 2 (each its full copy: no process group) seal steps 1..`steps`."""
    model, opt = _model()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    extras = [{"position": 0}, {"position": 0}]
    snaps = [ftd.Snapshotter(model, opt, scheduler=sched, extra=extras[r], rank=r, world_size=2, job=JOB,
                             socket=daemon.config.socket) for r in range(2)]
    for step in range(1, steps + 1):
        _train(model, opt, step)
        sched.step()
        for r, s in enumerate(snaps):
            extras[r]["position"] = 10 * step + r
            snap(s, step)
    rng = torch.get_rng_state().numpy().tobytes()
    for s in snaps:
        s.close()
    return model, opt, extras, rng


def test_a_world_of_one_reshards_the_newest_step_of_two_from_memory(tmp_path):
    daemon = _daemon(tmp_path)
    try:
        model, opt, _, rng = _world_of_two(daemon, 3)
        fresh, fresh_opt = _model()
        fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1, gamma=0.5)
        extra = {"position": -1}
        torch.manual_seed(1234)
        with snapshotter(daemon.config.socket, fresh, fresh_opt, job=JOB, scheduler=fresh_sched, extra=extra) as s:
            assert s.restore() == 3
            assert s.stats.restore_resharded and s.stats.restore_old_world == 2
            assert s.stats.restore_source == "local" and s.stats.restore_moved["peers"] == 0
            assert s.stats.restore_moved["local"] > 0
        assert _bytes(fresh, fresh_opt) == _bytes(model, opt)
        assert fresh_sched.last_epoch == 3 and fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert extra == {"position": 30}  # old rank 0's
        assert torch.get_rng_state().numpy().tobytes() == rng
        client = DaemonClient(daemon.config.socket, JOB, 0, 10.0)
        try:
            status = client.status()
        finally:
            client.close()
        assert [(r.rank, r.step, r.old_world_size, r.world_size) for r in status.reshards] == [(0, 3, 2, 1)]
        assert status.reshards[0].bytes_local == s.stats.restore_moved["local"]
        value = daemon.metrics.registry.get_sample_value
        assert value("ftd_reshards_total") == 1
        assert value("ftd_reshard_bytes_total", {"source": "local"}) == status.reshards[0].bytes_local
    finally:
        daemon.stop(grace=0.5)


def test_the_scripts_hook_chooses_extra_and_a_corrupt_segment_falls_back_to_the_older_step(tmp_path):
    daemon = _daemon(tmp_path)
    try:
        _world_of_two(daemon, 2)
        # Flip one byte of the same optimizer entry in both old ranks' step 2: that step cannot be made whole
        # from any copy; step 1 is resharded instead.
        for path in (tmp_path / "shm").glob(f"ftd-{JOB}/rank-*/*.manifest.json"):
            manifest = Manifest.from_json(path.read_bytes())
            if manifest.step != 2:
                continue
            entry = next(e for e in manifest.entries if e.name.startswith("optim/"))
            with open(path.with_name(path.name.replace(".manifest.json", ".seg")), "r+b") as f:
                f.seek(entry.offset)
                byte = f.read(1)
                f.seek(entry.offset)
                f.write(bytes([byte[0] ^ 1]))
        fresh, fresh_opt = _model()
        extra: dict = {}
        with snapshotter(daemon.config.socket, fresh, fresh_opt, job=JOB, extra=extra,
                         reshard_extra=lambda olds: {"position": sum(o["position"] for o in olds)}) as s:
            step = s.restore()
        assert step == 1
        assert extra == {"position": 10 + 11}  # the hook saw both old ranks' extras of step 1
    finally:
        daemon.stop(grace=0.5)
