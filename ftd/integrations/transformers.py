"""ftd for the Hugging Face `Trainer`: snapshot after every optimizer step, resume where the snapshot was taken.

    from ftd.integrations.transformers import FtdTrainer
    trainer = FtdTrainer(model=model, args=args, train_dataset=ds)   # adds an FtdCallback
    trainer.train()                                                # resumes from the daemon when it holds a step

or, with a Trainer subclass of your own (TRL's SFTTrainer, ...):

    class MyTrainer(FtdTrainerMixin, SFTTrainer): ...
    trainer = MyTrainer(..., callbacks=[FtdCallback(every=1, job="x")])

How the resume works. The Trainer computes where its loop starts (epochs done, batches to skip
in the current epoch) from `state.global_step` of the checkpoint it resumes, before it creates
the optimizer; a callback runs only after that. So `FtdTrainerMixin.train()` first looks up the
step the daemon will restore (verified against the model) and hands the Trainer a checkpoint
directory that holds nothing but that step's `trainer_state.json` (JSON, taken from the
snapshot's `extra`). The Trainer's own resume path then positions the data loader exactly as for
one of its checkpoints (`skip_first_batches`, sampler epoch). Model and optimizer weights,
scheduler, GradScaler and RNG come from the daemon: `_load_from_checkpoint` is skipped for that
directory, `FtdCallback.on_train_begin` restores that very step, and `_load_rng_state` applies
the snapshot's RNG at the moment the Trainer would apply a checkpoint's.

Exact on resume (tests/integration/test_hf_trainer.py): parameters, optimizer, LR schedule,
RNG (dropout), the data order and position (the default seedable sampler, any gradient
accumulation), `TrainerState` (global step, epoch, log history, stateful callbacks such as
EarlyStopping); the GradScaler's scale and growth tracker travel in `extra` (fp16 needs a GPU: not
exercised by the CPU test); under DDP (torchrun; test_integrations_ddp.py: 3 ranks, one SIGKILLed)
the same on every rank, DDP's gradient buckets included. Not exact: the loss the Trainer *logs*
for the first logging window after a resume (it averages only the steps run since the resume,
as after any Trainer resume), the `train_loss`/speed metrics of `train()`, and log history
entries of the snapshot's own step that were logged after it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerControl

import ftd
from ftd.errors import ConfigError, RestoreError
from ftd.integrations._resume import peek

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
MARKER = "ftd-resume.json"  # tells an ftd resume directory apart from a real checkpoint

__all__ = ["FtdCallback", "FtdTrainer", "FtdTrainerMixin"]


class FtdCallback(TrainerCallback):
    """Snapshots into the ftd daemon after every `every`-th optimizer step; restores at train begin.

    Settings are ftd.Snapshotter's keyword arguments (`job=`, `socket=`, ...; else `FTD_*`).
    It needs a Trainer with FtdTrainerMixin (FtdTrainer): the mixin positions the loop.
    `stats` is the Snapshotter's SnapshotStats once training began.
    """

    def __init__(self, every: int = 1, **settings: Any):
        if every < 1:
            raise ConfigError(f"FtdCallback(every=...) must be >= 1, got {every}")
        self.every, self.settings = every, settings
        self.trainer: Trainer | None = None
        self.snap: ftd.Snapshotter | None = None
        self.resume_step = 0
        self.resume_dir: str | None = None
        self._rng_pending = False

    @property
    def stats(self) -> ftd.SnapshotStats | None:
        return self.snap.stats if self.snap is not None else None

    # ---- called by FtdTrainerMixin ------------------------------------------------------------

    def prepare(self, trainer: Trainer) -> str | None:
        """Find the step to resume; return a resume directory for `Trainer.train` (None: start fresh)."""
        self.trainer = trainer
        self.cleanup()
        probe = ftd.Snapshotter(trainer.model, None, **self.settings)
        try:
            step, extra = peek(probe)
        finally:
            probe.close()
        if not step:
            return None
        if not extra or not isinstance(extra.get("trainer_state"), str):
            log.warning("step %d holds no Trainer state (it was not taken by FtdCallback); training starts fresh",
                        step)
            return None
        path = tempfile.mkdtemp(prefix=f"ftd-resume-{step}-")
        with open(os.path.join(path, TRAINER_STATE), "w") as f:
            f.write(extra["trainer_state"])
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump({"step": step}, f)
        self.resume_step, self.resume_dir = step, path
        return path

    def owns(self, checkpoint: Any) -> bool:
        """Whether `checkpoint` is the resume directory this callback made."""
        return checkpoint is not None and self.resume_dir is not None and str(checkpoint) == self.resume_dir

    def apply_rng(self) -> None:
        """Apply the restored step's RNG state (when the Trainer would load a checkpoint's)."""
        if self._rng_pending and self.snap is not None:
            self._rng_pending = False
            self.snap.restore_rng()

    def cleanup(self) -> None:
        if self.resume_dir is not None:
            shutil.rmtree(self.resume_dir, ignore_errors=True)
        self.resume_dir, self.resume_step = None, 0

    # ---- TrainerCallback -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if trainer is None:
            raise ConfigError("FtdCallback needs a Trainer with FtdTrainerMixin (ftd.integrations.transformers."
                              "FtdTrainer): a plain Trainer cannot be told to resume at the restored step")
        optimizer = _torch_optimizer(trainer.optimizer)
        wrapped = getattr(trainer, "model_wrapped", None)  # under DDP: the DDP module (its buckets are kept)
        ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        self.snap = ftd.Snapshotter(trainer.model, optimizer, scheduler=trainer.lr_scheduler, extra=self._extra,
                                    ddp=ddp, **self.settings)
        if not self.resume_step:
            return
        got = self.snap.restore(restore_rng=False, steps=[self.resume_step])
        if got != self.resume_step:
            raise RestoreError(f"step {self.resume_step} verified against the model but could not be loaded into "
                               f"the optimizer and scheduler ({self.snap.stats.restore_failures}); the Trainer "
                               "already starts at that step, so training cannot go on: restart it")
        scaler = getattr(trainer.accelerator, "scaler", None)
        saved = (self.snap.restored_extra or {}).get("scaler")
        if scaler is not None and saved:
            scaler.load_state_dict(saved)
        self._rng_pending = True
        log.info("resuming the Trainer at global step %d from ftd", got)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.apply_rng()  # in case the Trainer did not call _load_rng_state (nothing to skip, old versions)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.snap is not None and state.global_step % self.every == 0:
            self.snap.snapshot(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.snap is not None:
            self.snap.wait()
            self.snap.close()
        self.cleanup()

    def _extra(self) -> dict[str, Any]:
        """The Trainer's state as its own checkpoints hold it (JSON text), and the GradScaler's."""
        trainer = self.trainer
        assert trainer is not None
        doc = dataclasses.asdict(trainer.state)
        callbacks: dict[str, Any] = {}
        for cb in trainer.callback_handler.callbacks:  # as Trainer._save_checkpoint, less TrainerControl
            if isinstance(cb, ExportableState) and not isinstance(cb, TrainerControl):
                name = type(cb).__name__
                if name in callbacks:
                    previous = callbacks[name]
                    callbacks[name] = [*(previous if isinstance(previous, list) else [previous]), cb.state()]
                else:
                    callbacks[name] = cb.state()
        doc["stateful_callbacks"] = callbacks
        scaler = getattr(trainer.accelerator, "scaler", None)
        return {"trainer_state": json.dumps(doc, sort_keys=True),
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}


class FtdTrainerMixin:
    """Mix into a `transformers.Trainer` subclass (before it) so that `train()` resumes from ftd.

    Uses the FtdCallback among the trainer's callbacks, adding `FtdCallback()` when there is
    none. `train(resume_from_checkpoint=...)` with a checkpoint of your own resumes from it as
    usual (ftd then only snapshots).
    """

    def ftd_callback(self) -> FtdCallback:
        handler = self.callback_handler  # type: ignore[attr-defined]
        for cb in handler.callbacks:
            if isinstance(cb, FtdCallback):
                return cb
        cb = FtdCallback()
        handler.add_callback(cb)
        return cb

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        cb = self.ftd_callback()
        cb.trainer = self  # type: ignore[assignment]
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            resume_from_checkpoint = cb.prepare(self)  # type: ignore[arg-type]
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            cb.cleanup()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self.ftd_callback().owns(resume_from_checkpoint):
            return  # the weights come from the daemon in FtdCallback.on_train_begin
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_rng_state(self, checkpoint: str | None) -> None:
        cb = self.ftd_callback()
        if cb.owns(checkpoint):
            cb.apply_rng()
            return
        super()._load_rng_state(checkpoint)  # type: ignore[misc]


class FtdTrainer(FtdTrainerMixin, Trainer):
    """`transformers.Trainer` that snapshots into the ftd daemon and resumes from it (see the module doc)."""


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (its step hooks are the inner one's)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer
