"""A plain DDP training script for a small GPT, with the few lines ftd needs (marked `# ftd`).

    ftd daemon &                                   # once per node (FTD_JOB / FTD_SOCKET shared via env)
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node=2 --max-restarts=3 \\
        examples/ddp_gpt.py --steps 200

Kill any worker (or the daemon) while it runs: torchrun restarts the workers and they continue
from the newest step every rank holds, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ftd  # ftd

TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "))


class GPT(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 2, context: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, dim), nn.Parameter(torch.randn(context, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, 0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return self.head(self.blocks(self.tok(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True))


def batch(step: int, rank: int, size: int = 16, context: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    starts = torch.randint(0, len(TEXT), (size, 1), generator=g)
    seq = TEXT[(starts + torch.arange(context + 1)) % len(TEXT)]
    return seq[:, :-1], seq[:, 1:]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def main(make_opt=make_optimizer) -> None:  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200, help="stop after this step")
    p.add_argument("--schedule-steps", type=int, default=200, help="length of the LR schedule")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--results", default="", help="append a JSON line with the run's facts ({rank} is replaced)")
    args = p.parse_args()
    torch.set_num_threads(1)  # fixed: the thread count changes reduction bits
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = GPT()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = make_opt(model, args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.schedule_steps,
                                                cycle_momentum=False)

    snap = ftd.Snapshotter(model, optimizer, scheduler=sched, ddp=ddp)  # ftd: ddp= keeps its buckets (bit-exact)
    start = snap.restore()  # ftd: 0 on a fresh start

    for step in range(start, args.steps):
        x, y = batch(step, rank)
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        snap.snapshot(step + 1)  # ftd: returns at once; the copy overlaps the next step
        if rank == 0 and step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} (stall {snap.stats.last_stall_s * 1e3:.1f} ms)", flush=True)
    snap.close()  # ftd
    if args.results:  # for programs (the tests): where this run started and what its snapshots did
        with open(args.results.replace("{rank}", str(rank)), "a") as f:
            f.write(json.dumps({"event": "done", "rank": rank, "time": time.time(), "started_at": start,
                                "last_step": args.steps, **snap.stats.to_json()}) + "\n")
    if rank == 0:
        print(f"done at step {args.steps} (started at {start}) world {dist.get_world_size()} pid {os.getpid()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
