"""A plain training script with ftd: a small GPT, AdamW, warm-up/cosine schedule, dropout.

Runs alone or under torchrun (DDP on gloo). Resumes from the ftd daemon when it has a snapshot.
Writes each step's loss (as a float hex string, to compare bit for bit) to `--losses` and the
final parameters to `--out`. Used by `ftd demo` and the integration tests.

    python -m ftd.demo.train --steps 50 --losses /tmp/l.jsonl --out /tmp/p.pt
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

import ftd
from ftd.demo import results
from ftd.demo.model import TinyGPT, batch, warmup_cosine

log = logging.getLogger("ftd.demo.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--stop-at", type=int, default=None, help="exit cleanly after this step (the schedule still "
                   "spans --steps)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed: thread count changes the bits)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (lets tests kill mid-run)")
    p.add_argument("--losses", default="", help="append {'step', 'loss'} JSON lines here")
    p.add_argument("--out", default="", help="write final parameters here ({rank} is replaced)")
    p.add_argument("--results", default="", help="append the restore's and the run's facts here as JSON lines "
                   "({rank} is replaced; see ftd.demo.results)")
    p.add_argument("--save-restored", default="", help="after the restore, save this rank's model and optimizer "
                   "tensors under their global names ({rank} and {step} are replaced; FSDP: local shards)")
    p.add_argument("--no-ftd", action="store_true", help="train without snapshots (the reference run)")
    p.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeroRedundancyOptimizer)")
    p.add_argument("--shard-replicated", action="store_true", help="each DDP rank snapshots 1/world of the "
                   "replicated parameters and optimizer state (Snapshotter(shard_replicated=True))")
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state with FSDP2 "
                   "fully_shard instead of DDP (each rank snapshots its local shards)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("FTD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s train[%(process)d] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    model = TinyGPT(dim=args.dim, layers=args.layers, context=args.context)
    net: torch.nn.Module = model
    if world > 1 and args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.blocks.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if args.zero and world > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer: torch.optim.Optimizer = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=args.lr, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, warmup=max(1, args.steps // 10), total=args.steps)
    data_position = {"step": 0}
    snap = None if args.no_ftd else ftd.Snapshotter(model, optimizer, scheduler=scheduler, extra=data_position,
                                                    shard_replicated=args.shard_replicated or None,
                                                    ddp=net if net is not model else None)
    start = snap.restore() if snap else 0
    if start:
        log.info("rank %d resumed at step %d (data position %s)", rank, start, data_position)
    if snap:
        results.write(args.results, "restore", rank, snap.stats, data_position=data_position["step"])
    if args.save_restored and start:
        _save_restored(args.save_restored.replace("{rank}", str(rank)).replace("{step}", str(start)), model,
                       optimizer)
    losses = open(args.losses, "a") if args.losses else None
    for step in range(start, args.steps if args.stop_at is None else min(args.stop_at, args.steps)):
        x, y = batch(step, rank, args.batch, args.context, args.seed)
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        data_position["step"] = step + 1
        if snap:
            snap.snapshot(step + 1)
        if losses:
            losses.write(json.dumps({"step": step, "rank": rank, "loss": loss.item().hex()}) + "\n")
            losses.flush()
        if args.step_sleep:
            time.sleep(args.step_sleep)
    if snap:
        snap.wait()
        s = snap.stats
        log.info("rank %d done: %d snapshots sealed, %d skipped %s, median stall %.2f ms", rank, s.sealed,
                 s.skipped, dict(s.skip_reasons), s.median_stall_s * 1e3)
        snap.close()
        results.write(args.results, "done", rank, s, started_at=start, last_step=data_position["step"])
    if args.out:
        local = {k: v.to_local() if hasattr(v, "to_local") else v  # FSDP: this rank's shards
                 for k, v in model.state_dict().items()}
        torch.save({k: v.detach().clone() for k, v in local.items()}, args.out.replace("{rank}", str(rank)))
    if world > 1:
        dist.barrier()  # every rank is done before rank 0, which hosts the store, tears the group down
        dist.destroy_process_group()
    return 0


def _save_restored(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """This rank's restored tensors as `model.<fqn>` / `optim.state.<fqn>.<key>` (DTensors: the local shard)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()

    out = {f"model.{k}": local(v) for k, v in get_model_state_dict(model).items()}
    for fqn, values in get_optimizer_state_dict(model, optimizer)["state"].items():
        out.update({f"optim.state.{fqn}.{k}": local(v) for k, v in values.items() if isinstance(v, torch.Tensor)})
    torch.save(out, path)


if __name__ == "__main__":
    raise SystemExit(main())
