"""One rank of the reshard benchmark's new world (ftd/bench/reshard.py), under torchrun.

It builds the demo model (DDP or FSDP2 on gloo) twice (after a third, untimed copy has paid the
process's one-off setup of DCP state dicts and DTensor ops). The first copy reshards the old world's newest
whole step from the daemons' memory (`memreshard.restore`), the second the same step from the
durable tier (`reshard.restore`, the directory's page cache dropped first unless --warm), each timed
around the library call. The two copies must hold the same bytes. One JSON line per rank goes to
--results.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ftd
from ftd.client import memreshard, reshard
from ftd.demo.model import TinyGPT, warmup_cosine


def _build(args: argparse.Namespace, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(args.seed)
    model = TinyGPT(dim=args.dim, layers=args.layers, context=args.context)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.blocks.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, optimizer, warmup_cosine(optimizer, warmup=1, total=args.steps)


def _local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[bytes]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    def raw(t: torch.Tensor) -> bytes:
        t = (t.to_local() if hasattr(t, "to_local") else t).detach().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    out = [raw(v) for _, v in sorted(get_model_state_dict(model).items())]
    for _, values in sorted(get_optimizer_state_dict(model, optimizer)["state"].items()):
        out += [raw(v) for _, v in sorted(values.items()) if isinstance(v, torch.Tensor)]
    return out


def _drop_cache(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--warm", action="store_true", help="leave the durable files in the page cache")
    p.add_argument("--results", default="")
    p.add_argument("--losses", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    job = os.environ["FTD_JOB"]
    durable = os.environ["FTD_DURABLE_DIR"]

    # Both paths build DCP's state dicts of a fresh optimizer (a step on zeros) and run DTensor ops; the
    # first time in a process costs seconds of one-off setup whichever path pays it. Paid here, untimed.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    warm_model, warm_opt, _ = _build(args, world)
    t_setup = time.perf_counter()
    get_optimizer_state_dict(warm_model, warm_opt)
    setup_s = time.perf_counter() - t_setup
    del warm_model, warm_opt
    model, opt, sched = _build(args, world)
    snap = ftd.Snapshotter(model, opt, scheduler=sched)
    extra: dict = {}
    dist.barrier()
    profile = os.environ.get("RESHARD_BENCH_PROFILE")
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    mem = memreshard.restore(snap.client, job, rank, world, model, opt, sched, extra,
                             timeout=snap.config.restore_timeout, run=snap.config.run)
    mem_s = time.perf_counter() - t0
    if profile:
        profiler.disable()
        profiler.dump_stats(f"{profile}.{rank}")
    dist.barrier()
    mem_wall = time.perf_counter() - t0

    model2, opt2, sched2 = _build(args, world)
    if not args.warm and rank == 0:
        _drop_cache(Path(durable))
    dist.barrier()
    t1 = time.perf_counter()
    step, dur_s, _ = reshard.restore(durable, job, rank, world, model2, opt2, sched2, {})
    dist.barrier()
    dur_wall = time.perf_counter() - t1
    same = _local_bytes(model, opt) == _local_bytes(model2, opt2)
    local_state = sum(len(b) for b in _local_bytes(model, opt))
    doc = {"rank": rank, "world": world, "memory_step": mem.step if mem else 0, "durable_step": step,
           "memory_s": mem_s, "memory_wall_s": mem_wall, "durable_s": dur_s, "durable_wall_s": dur_wall,
           "same_bytes": same, "local_state_bytes": local_state,
           "moved": {"local": mem.moved.local, "peers": mem.moved.peers, "decoded": mem.moved.decoded} if mem else {},
           "old_world": mem.old_world if mem else 0, "warm": args.warm, "setup_s": setup_s}
    if args.results:
        with open(args.results.replace("{rank}", str(rank)), "a") as f:
            f.write(json.dumps(doc) + "\n")
    snap.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
