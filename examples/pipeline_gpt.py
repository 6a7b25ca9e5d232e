"""A pipeline-parallel GPT: one stage per process over gloo send/recv, with ftd and CheckFree (marked `# ftd`).

    ftd daemon &                                   # once per node (FTD_PEERS / FTD_EC across the nodes)
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=5 --nproc-per-node=1 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --max-restarts=3 examples/pipeline_gpt.py --steps 200

Rank r runs stage r: the first stage embeds, every stage holds `--blocks` identical transformer
blocks, the last adds the final norm and the head. Each step runs `--micro` micro-batches forward
(activations sent to the next stage) and backward (gradients sent to the previous one), GPipe
style, then every stage clips, records its gradient norm and steps its own optimizer.

Recovery (no manual step): torchrun restarts every stage after a failure; `restore_pipeline`
restores the newest step every stage holds. When a stage's snapshots are gone for good (its node
and more than `m` of its EC group lost), that stage is rebuilt from its neighbours with CheckFree
(a gradient-norm-weighted average of their weights, a fresh optimizer, a raised learning rate)
and training continues: a degraded recovery, exported as source="checkfree".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ftd  # ftd
from ftd.recovery import GradNormTracker, StageExtra, restore_pipeline  # ftd

TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "))


class Stage(nn.Module):
    """One pipeline stage: identical blocks, plus the embedding (first) or the head (last)."""

    def __init__(self, first: bool, last: bool, dim: int, blocks: int, context: int):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.tok = nn.Embedding(256, dim)
            self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, 0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        if last:
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.tok(x) + self.pos[: x.shape[1]]
        t = x.shape[1]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x)) if self.last else x


def batch(step: int, micro: int, size: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + micro)
    starts = torch.randint(0, len(TEXT), (size, 1), generator=g)
    seq = TEXT[(starts + torch.arange(context + 1)) % len(TEXT)]
    return seq[:, :-1], seq[:, 1:]


def train_step(stage: Stage, rank: int, world: int, step: int, args: argparse.Namespace) -> float:
    """GPipe: every micro-batch forward, then every micro-batch backward; returns the mean loss (last stage)."""
    shape = (args.batch, args.context, args.dim)
    saved, losses = [], []
    for mb in range(args.micro):
        x, y = batch(step, mb, args.batch, args.context)
        if not stage.first:
            x = torch.empty(shape)
            dist.recv(x, rank - 1)
            x.requires_grad_()
        out = stage(x)
        if stage.last:
            loss = F.cross_entropy(out.reshape(-1, 256), y.reshape(-1)) / args.micro
            losses.append(loss.item())
        else:
            dist.send(out.detach(), rank + 1)
            loss = out
        saved.append((x, loss))
    for x, out in saved:
        if stage.last:
            out.backward()
        else:
            grad = torch.empty(shape)
            dist.recv(grad, rank + 1)
            out.backward(grad)
        if not stage.first:
            dist.send(x.grad, rank - 1)
    return sum(losses)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=1, help="transformer blocks per stage")
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--losses", default="", help="the last stage appends {'step', 'loss'} lines here")
    p.add_argument("--results", default="", help="every stage appends a JSON line with its run's facts here "
                   "({rank} is replaced)")
    args = p.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s stage[%(process)d] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + rank)
    stage = Stage(rank == 0, rank == world - 1, args.dim, args.blocks, args.context)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    position = {"step": 0}
    tracker = GradNormTracker.attach(optimizer)                                     # ftd
    snap = ftd.Snapshotter(stage, optimizer, scheduler=scheduler, extra=StageExtra(tracker, position))  # ftd
    start = restore_pipeline(snap, stage=rank, stages=world)                        # ftd
    logging.info("stage %d/%d starts at step %d", rank, world, start)
    out = open(args.losses, "a") if args.losses and rank == world - 1 else None
    for step in range(start, args.steps):
        loss = train_step(stage, rank, world, step, args)
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)
        optimizer.step()  # the tracker's hook records this stage's gradient norm (after clipping)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        position["step"] = step + 1
        snap.snapshot(step + 1)                                                      # ftd
        if out:
            out.write(json.dumps({"step": step, "rank": rank, "loss": loss, "time": time.time()}) + "\n")
            out.flush()
        if args.step_sleep:
            time.sleep(args.step_sleep)
    snap.close()
    if args.results:  # for programs (the tests): how this stage was restored and what its snapshots did
        with open(args.results.replace("{rank}", str(rank)), "a") as f:
            f.write(json.dumps({"event": "done", "rank": rank, "time": time.time(), "started_at": start,
                                "last_step": args.steps, **snap.stats.to_json()}) + "\n")
    logging.info("stage %d done at step %d (started at %d)", rank, args.steps, start)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
