"""Helpers of the unit tests that drive a real Snapshotter against the in-process daemon (conftest's socket_path)."""

from __future__ import annotations

from typing import Any

import ftd

WAIT_S = 30.0


def snapshotter(socket_path: str, model: Any, optimizer: Any = None, *, job: str, **kwargs: Any) -> ftd.Snapshotter:
    """A rank-0, world-size-1 Snapshotter of `job` on the daemon at `socket_path`."""
    return ftd.Snapshotter(model, optimizer, rank=0, world_size=1, job=job, socket=socket_path, **kwargs)


def snap(s: ftd.Snapshotter, step: int) -> None:
    """Snapshot `step` and wait until it is sealed."""
    sealed = s.stats.sealed
    s.snapshot(step)
    assert s.wait(WAIT_S)
    assert s.stats.sealed == sealed + 1, dict(s.stats.skip_reasons)
    assert s.stats.last_sealed_step == step


def restore_and_compare(socket_path: str, model: Any, fresh: Any, fresh_optimizer: Any, *,
                        job: str, step: int) -> None:
    """Restore `step` into `fresh` / `fresh_optimizer` through a new Snapshotter; the model's tensors must
    then equal `model`'s byte for byte."""
    snap2 = snapshotter(socket_path, fresh, fresh_optimizer, job=job)
    try:
        assert snap2.restore() == step
    finally:
        snap2.close()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert a.numpy().tobytes() == b.numpy().tobytes(), name
