"""A Hugging Face Trainer run of a tiny Llama (built from a config, nothing downloaded), with or without ftd.

Writes each micro-batch's loss (float hex) to --losses as {"step": global_step * GA + micro, "rank", "loss"},
the final parameters to --out and the FtdCallback's stats to --results ({rank} is replaced in both).
Under torchrun the Trainer runs DDP on gloo (`--no-find-unused`: DDP without find_unused_parameters,
so that it rebuilds its gradient buckets after the first step). Used by test_hf_trainer.py and
test_integrations_ddp.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from ftd.demo import results
from ftd.integrations.transformers import FtdCallback, FtdTrainerMixin


def dataset(n: int = 40, length: int = 16, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class Recording(Trainer):
    """Records each micro-batch's loss, keyed by (optimizer steps done, micro-batch within the step)."""

    losses_path = ""
    accumulation = 1
    rank = 0

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        out = super().compute_loss(model, inputs, return_outputs, **kwargs)
        loss = out[0] if return_outputs else out
        micro = getattr(self, "_micro", 0)
        self._micro = micro + 1
        if self.losses_path:
            with open(self.losses_path, "a") as f:
                f.write(json.dumps({"step": self.state.global_step * self.accumulation + micro,
                                    "rank": self.rank, "loss": loss.item().hex()}) + "\n")
        return out


class FtdRecording(FtdTrainerMixin, Recording):
    pass


class StepEnd(TrainerCallback):
    def __init__(self, trainer_ref: list[Any], sleep: float):
        self.ref, self.sleep = trainer_ref, sleep

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ref[0]._micro = 0
        if self.sleep:
            time.sleep(self.sleep)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ga", type=int, default=2)
    p.add_argument("--losses", default="")
    p.add_argument("--out", default="")
    p.add_argument("--results", default="")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--no-ftd", action="store_true")
    p.add_argument("--no-find-unused", action="store_true", help="DDP: find_unused_parameters=False")
    a = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         attention_dropout=0.1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=a.workdir, max_steps=a.steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=a.ga, learning_rate=3e-3, warmup_steps=2,
                             lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=1.0, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, ddp_find_unused_parameters=False if a.no_find_unused else None)
    ref: list[Any] = [None]
    cls = Recording if a.no_ftd else FtdRecording
    cls.losses_path, cls.accumulation, cls.rank = a.losses, a.ga, rank
    callbacks: list[Any] = [StepEnd(ref, a.step_sleep)]
    ftd_cb = None if a.no_ftd else FtdCallback()
    if ftd_cb is not None:
        callbacks.append(ftd_cb)
    trainer = cls(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    ref[0] = trainer
    trainer.train()
    if ftd_cb is not None and ftd_cb.stats is not None:
        results.write(a.results, "done", rank, ftd_cb.stats, log_history=trainer.state.log_history)
    if a.out:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, a.out.replace("{rank}", str(rank)))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is done before rank 0, which hosts the store, tears the group down
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
