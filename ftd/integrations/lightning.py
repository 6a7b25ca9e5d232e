"""ftd for PyTorch Lightning: a `Callback` that snapshots after every optimizer step and resumes the fit loop.

    from ftd.integrations.lightning import FtdCallback, ResumableDataLoader
    trainer = L.Trainer(max_steps=..., callbacks=[FtdCallback()])
    trainer.fit(module, ResumableDataLoader(ds, batch_size=8, shuffle=True, seed=0))

Works with `lightning` (`import lightning as L`) and with `pytorch_lightning`: the callback
subclasses the `Callback` of whichever is installed, `lightning.pytorch` first.

How the resume works. `on_fit_start` runs after Lightning built the optimizer and schedulers and
before the fit loop touches the data: the callback restores model, optimizer, scheduler, RNG and
the precision plugin's GradScaler from the daemon, then loads the fit loop's progress saved in
the snapshot's `extra` with `fit_loop.load_state_dict` -- what `trainer.fit(ckpt_path=...)` does
with a checkpoint's "loops" -- so Lightning's own restart logic continues at the next batch.
Snapshots are taken in `on_train_batch_end` after a batch that stepped the optimizer, where
Lightning's ModelCheckpoint saves too -- except the step that closes an epoch (resumed there,
Lightning would start the next epoch from an iterator made before the sampler learns the new
epoch): a crash right after it resumes one step earlier.

Where the data continues: Lightning restores a train loader's position only when the loader
is resumable (`state_dict`/`load_state_dict`); a plain `DataLoader` restarts its epoch from the
first batch (Lightning warns "resuming from a checkpoint that ended before the epoch ended").
`ResumableDataLoader` is such a loader for map-style datasets: its order is a function of
(seed, epoch), and on resume it skips the batches the epoch had done (without loading them).
Under DDP each rank takes its share of the epoch as DistributedSampler gives it (its sampler is
one, so Lightning keeps it rather than injecting its own).

Exact on resume (tests/integration/test_lightning.py): parameters, optimizer, LR schedulers
stepped per step or epoch, RNG (dropout), gradient accumulation, the GradScaler's state, the
loop's progress (global step, epoch, batch index) and, with ResumableDataLoader or at an epoch
boundary, the data; under DDP (test_integrations_ddp.py: 3 ranks, one SIGKILLed) the same on every
rank, DDP's gradient buckets included. Not carried: other callbacks' state (ModelCheckpoint,
EarlyStopping), the LightningModule's `on_save_checkpoint` extras, logged-metric accumulators, a
DataModule's state.
One optimizer and at most one scheduler; manual optimization is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized
from typing import Any

import torch

import ftd
from ftd.errors import ConfigError

try:
    import lightning.pytorch as pl
except ImportError:  # the smaller `pytorch-lightning` distribution
    import pytorch_lightning as pl  # type: ignore[no-redef]

log = logging.getLogger(__name__)

__all__ = ["EpochSampler", "FtdCallback", "ResumableDataLoader"]


class FtdCallback(pl.Callback):
    """Snapshots into the ftd daemon after every `every`-th optimizer step; restores in `on_fit_start`.

    Settings are ftd.Snapshotter's keyword arguments (`job=`, `socket=`, ...; else `FTD_*`).
    `stats` is the Snapshotter's SnapshotStats once fitting began; `restored_step` the step resumed.
    """

    def __init__(self, every: int = 1, **settings: Any):
        if every < 1:
            raise ConfigError(f"FtdCallback(every=...) must be >= 1, got {every}")
        self.every, self.settings = every, settings
        self.snap: ftd.Snapshotter | None = None
        self.restored_step = 0
        self._trainer: Any = None
        self._last_step = -1
        self._rng_pending = False

    @property
    def stats(self) -> ftd.SnapshotStats | None:
        return self.snap.stats if self.snap is not None else None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1 or len(trainer.lr_scheduler_configs) > 1:
            raise ConfigError("ftd's Lightning callback supports one optimizer and at most one LR scheduler, got "
                              f"{len(trainer.optimizers)} and {len(trainer.lr_scheduler_configs)}")
        if not pl_module.automatic_optimization:
            raise ConfigError("ftd's Lightning callback needs automatic optimization")
        self._trainer = trainer
        scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        wrapped = getattr(trainer.strategy, "model", None)  # DDPStrategy: the DDP module (its buckets are kept)
        ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        self.snap = ftd.Snapshotter(pl_module, trainer.optimizers[0], scheduler=scheduler, extra=self._extra,
                                    ddp=ddp, **self.settings)
        step = self.snap.restore(restore_rng=False)
        self._last_step = trainer.global_step
        if not step:
            return
        extra = self.snap.restored_extra or {}
        if not isinstance(extra.get("fit_loop"), dict):
            raise ConfigError(f"step {step} holds no Lightning loop state (it was not taken by this callback); "
                              "the model and optimizer hold it now: discard the job's snapshots (`ftd rm`) or "
                              "resume with the program that took them")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        trainer.fit_loop.load_state_dict(extra["fit_loop"])
        self._last_step = trainer.global_step
        self.restored_step = step
        # Creating a DataLoader iterator draws its base seed from the torch RNG: the uninterrupted run made
        # this epoch's long before the snapshot, so the RNG goes back once the fit loop made its
        # iterator (on_train_start).
        self._rng_pending = True
        log.info("resuming the fit loop at global step %d (epoch %d) from ftd", trainer.global_step,
                 trainer.current_epoch)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._rng_pending and self.snap is not None:
            self._rng_pending = False
            self.snap.restore_rng()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches:
            # The step that closes an epoch is not snapshotted: resumed there, Lightning starts the next
            # epoch from the iterator it made before the sampler learns the new epoch. A crash after it
            # resumes one step earlier (mid-epoch, which is exact). Nor later: after the next epoch's first
            # batch its gradient would be accumulated but not in the snapshot.
            self._last_step = trainer.global_step
            return
        self._maybe_snapshot(trainer)

    def _maybe_snapshot(self, trainer: Any) -> None:
        step = trainer.global_step
        if self.snap is not None and step != self._last_step:  # the optimizer stepped since the last one
            self._last_step = step
            if step % self.every == 0:
                self.snap.snapshot(step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.snap is not None:
            self.snap.wait()
            self.snap.close()

    def _extra(self) -> dict[str, Any]:
        """The fit loop's progress (as a checkpoint's "loops" holds it) and the GradScaler's state."""
        trainer = self._trainer
        state = trainer.fit_loop.state_dict()
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        loaders = state.get("state_dict", {}).get("combined_loader")
        if loaders:
            # Lightning has fetched the next batch already: a ResumableDataLoader's own count is one ahead
            state["state_dict"]["combined_loader"] = [dict(s, batches=done) if s.get("kind") == _KIND else s
                                                      for s in loaders]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return {"fit_loop": state, "scaler": scaler.state_dict() if scaler is not None else None}


_KIND = "ftd.ResumableDataLoader"


class EpochSampler(torch.utils.data.DistributedSampler):
    """Indices 0..n-1, shuffled by a generator seeded with `seed + epoch` (or in order), resumable mid-epoch.

    `set_epoch(e)` chooses the epoch (Lightning calls it at each epoch's start; without it each
    pass is the next epoch); `skip` indices of the next pass are left out (a resumed epoch).
    Under torch.distributed (looked up when iterated: Lightning starts the group after the loader
    is made) each rank takes its share as DistributedSampler does: the epoch's order padded to a
    multiple of the world size, every world-th index from the rank's. Being a DistributedSampler,
    Lightning leaves it in place instead of injecting one of its own.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):  # not DistributedSampler.__init__: no group yet
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.drop_last = False
        self.epoch, self.skip, self.yielded = 0, 0, 0
        self._epoch_set = False

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """This rank's indices per epoch."""
        return -(-self.n // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def __len__(self) -> int:
        return self.num_samples

    def _order(self) -> list[int]:
        """This rank's indices of the current epoch."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        world = self.num_replicas
        if world > 1 and order:
            total = self.num_samples * world
            order = (order * -(-total // len(order)))[:total]  # padded as DistributedSampler pads
        return order[self.rank::world]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        skip, self.skip = self.skip, 0
        self.yielded = skip
        for index in order[skip:]:
            self.yielded += 1
            yield index
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a map-style dataset whose position Lightning saves and restores.

    Order per epoch from (`seed`, epoch) when `shuffle`; `state_dict()`/`load_state_dict()` are
    Lightning's protocol for resumable loaders. Other keyword arguments go to DataLoader
    (`num_workers`, `collate_fn`, `drop_last`, ...); `sampler`/`batch_sampler` cannot be given.
    """

    def __init__(self, dataset: Sized, batch_size: int = 1, shuffle: bool = False, seed: int = 0, **kwargs: Any):
        self.epoch_sampler = EpochSampler(len(dataset), shuffle, seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kwargs)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": _KIND, "epoch": self.epoch_sampler.epoch,
                "batches": self.epoch_sampler.yielded // (self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_sampler.set_epoch(int(state["epoch"]))
        self.epoch_sampler.skip = int(state["batches"]) * (self.batch_size or 1)
