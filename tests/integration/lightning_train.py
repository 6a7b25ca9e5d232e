"""A Lightning Trainer run of a tiny LightningModule (MLP with dropout, AdamW, per-step cosine schedule,
gradient accumulation 2), with or without ftd's callback.

Writes each batch's loss (float hex) to --losses as {"step": epoch * batches + batch_idx, "rank", "loss"},
the final parameters to --out and the callback's stats to --results ({rank} is replaced in both).
`--devices N` (under torchrun with N processes): strategy "ddp" on CPU (gloo). Used by test_lightning.py
and test_integrations_ddp.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ftd.demo import results
from ftd.integrations.lightning import FtdCallback, ResumableDataLoader

SAMPLES, BATCH = 48, 4  # 12 batches per epoch, 6 optimizer steps


class Tiny(pl.LightningModule):
    def __init__(self, losses: str, sleep: float, total_steps: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(32, 4))
        self.losses, self.sleep, self.total_steps = losses, sleep, total_steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if self.losses:
            key = self.current_epoch * self.trainer.num_training_batches + batch_idx
            with open(self.losses, "a") as f:
                f.write(json.dumps({"step": key, "rank": self.global_rank, "loss": loss.item().hex()}) + "\n")
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.sleep:
            time.sleep(self.sleep)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(steps: int, total_steps: int, losses: str = "", sleep: float = 0.0, use_ftd: bool = True,
        plain_loader: bool = False, devices: int = 1) -> tuple[Tiny, pl.Trainer, FtdCallback | None]:
    """Train a fresh seeded Tiny for `steps` optimizer steps of a `total_steps` schedule (resuming from ftd)."""
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(99)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 8, generator=gen), torch.randn(SAMPLES, 4, generator=gen))
    module = Tiny(losses, sleep, total_steps)
    callback = FtdCallback() if use_ftd else None
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=2, callbacks=[callback] if callback else [],
                         accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    if plain_loader:
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    else:
        loader = ResumableDataLoader(data, batch_size=BATCH, shuffle=True, seed=5)
    trainer.fit(module, loader)
    return module, trainer, callback


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--losses", default="")
    p.add_argument("--out", default="")
    p.add_argument("--results", default="")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--no-ftd", action="store_true")
    p.add_argument("--devices", type=int, default=1, help="DDP ranks (run under torchrun with as many)")
    a = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    module, trainer, callback = fit(a.steps, a.steps, a.losses, a.step_sleep, not a.no_ftd, devices=a.devices)
    if callback is not None and callback.stats is not None:
        results.write(a.results, "done", rank, callback.stats, global_step=trainer.global_step,
                      epoch=trainer.current_epoch)
    if a.out:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save(state, a.out.replace("{rank}", str(rank)))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is done before rank 0, which hosts the store, tears the group down
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
