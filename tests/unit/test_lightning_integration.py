"""ftd's Lightning integration in one process: the EpochSampler alone gives the whole shuffled epoch and
under a process group each rank's share exactly as torch's DistributedSampler does (so Lightning leaves
it in place), resumable mid-epoch per rank; the callback never snapshots the step that closes an epoch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("lightning") is None:
    pytest.importorskip("pytorch_lightning")

from ftd.integrations.lightning import EpochSampler  # noqa: E402


def _world(monkeypatch: pytest.MonkeyPatch, size: int, rank: int) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: size)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)


def test_alone_it_is_the_whole_epoch():
    sampler = EpochSampler(10, seed=3)
    assert len(sampler) == 10 and sorted(sampler) == list(range(10))
    assert isinstance(sampler, torch.utils.data.DistributedSampler)


@pytest.mark.parametrize("n", [12, 13])
@pytest.mark.parametrize("shuffle", [True, False])
def test_each_rank_takes_the_share_distributed_sampler_gives(monkeypatch: pytest.MonkeyPatch, n: int,
                                                              shuffle: bool):
    for rank in range(3):
        _world(monkeypatch, 3, rank)
        ours = EpochSampler(n, shuffle=shuffle, seed=5)
        torchs = torch.utils.data.DistributedSampler(range(n), num_replicas=3, rank=rank, shuffle=shuffle, seed=5)
        for epoch in range(2):
            ours.set_epoch(epoch)
            torchs.set_epoch(epoch)
            assert len(ours) == len(torchs) and list(ours) == list(torchs), (rank, epoch)


def test_a_rank_resumes_its_share_mid_epoch(monkeypatch: pytest.MonkeyPatch):
    _world(monkeypatch, 3, 1)
    whole = list(EpochSampler(13, seed=7))
    resumed = EpochSampler(13, seed=7)
    resumed.skip = 2
    assert list(resumed) == whole[2:] and resumed.yielded == len(whole)


class _Snap:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def snapshot(self, step: int) -> None:
        self.steps.append(step)


def _batch_ends(batches: int, accumulate: int, epochs: int) -> list[tuple[int, int]]:
    """(batches processed in the epoch, global step) after each batch."""
    ends, step = [], 0
    for _ in range(epochs):
        for done in range(1, batches + 1):
            step += int(done % accumulate == 0 or done == batches)
            ends.append((done, step))
    return ends


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_step_closing_an_epoch_is_never_snapshotted(accumulate: int):
    """Not at its own batch, nor after the next epoch's first one (whose gradient is only accumulated)."""
    from types import SimpleNamespace

    from ftd.integrations.lightning import FtdCallback

    cb = FtdCallback()
    cb.snap, cb._last_step = _Snap(), 0  # type: ignore[assignment]  # as on_fit_start leaves them
    progress = SimpleNamespace(processed=0)
    trainer = SimpleNamespace(global_step=0, num_training_batches=4, fit_loop=SimpleNamespace(
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=progress))))
    for progress.processed, trainer.global_step in _batch_ends(4, accumulate, 3):
        cb.on_train_batch_end(trainer, None, None, None, 0)
    closing = {e * 4 // accumulate for e in (1, 2, 3)}
    assert cb.snap.steps == [s for s in range(1, 3 * 4 // accumulate + 1) if s not in closing]
