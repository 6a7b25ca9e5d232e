"""`ftd bench`: ftd against what users pick today — torch.save, torch.distributed.checkpoint
(dcp.save, dcp.async_save with the thread and the process checkpointer), torchsnapshot — and a
plain memcpy as the physical reference, on the same training state, in one run.

    ftd bench [--sizes 256MiB,1GiB] [--repeats 3] [--methods ...] [--device cpu|cuda] [--out-dir bench/results]

Per size: the stall the training loop sees per save (with a simulated forward/backward between
saves, and with none), the time until the save is complete, the restore time (into a fresh
process), peak RSS and bytes written. Then the step time of a small real training loop with no
checkpoints / ftd every step / torch.save and dcp.async_save every step and every 10 steps, and
the time to protection and to rebuild on a loopback cluster of 2 -> 4 daemons with erasure coding.
Writes compare-<date>.json, compare-<date>.md and up to 4 PNGs into --out-dir. Every daemon,
subprocess and /dev/shm directory it creates is removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from ftd.bench.common import GIB, Workspace, fmt_size, log, machine_info, parse_size

DEFAULT_SIZES = "256MiB,1GiB"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ftd.bench.methods import METHODS

    p.add_argument("--sizes", default=DEFAULT_SIZES, help="state sizes (params + AdamW state), comma separated")
    p.add_argument("--with-4gib", action="store_true", help="add a 4GiB size (skipped with a reason if memory is short)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma separated subset of {','.join(METHODS)}")
    p.add_argument("--layers", type=int, default=4, help="square nn.Linear layers in the state")
    p.add_argument("--compute-s", type=float, default=0.4,
                   help="seconds of simulated forward/backward between saves (0: skip the with-compute loop)")
    p.add_argument("--restore", choices=("subprocess", "inprocess"), default="subprocess",
                   help="restore into a fresh process, or into a fresh model/optimizer in this process")
    p.add_argument("--restore-timeout", type=float, default=300)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the state lives there; ftd copies device->shm)")
    p.add_argument("--no-loop", action="store_true", help="skip the training-loop overhead part")
    p.add_argument("--loop-steps", type=int, default=20)
    p.add_argument("--loop-dim", type=int, default=2048)
    p.add_argument("--loop-layers", type=int, default=4)
    p.add_argument("--loop-batch", type=int, default=256)
    p.add_argument("--no-scaling", action="store_true", help="skip the loopback cluster part")
    p.add_argument("--scale-nodes", default="2,4", help="cluster sizes for the scaling part (8 is heavy)")
    p.add_argument("--scale-mib", type=int, default=64, help="snapshot MiB per node in the scaling part")
    p.add_argument("--scale-timeout", type=float, default=120)
    p.add_argument("--out-dir", default="bench/results", help="where the JSON, markdown and PNGs go")
    p.add_argument("--tag", default="", help="file name suffix: compare-<date><tag>.json")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--disk-dir", default=None, help="directory on disk for torch.save -> disk (default $TMPDIR)")


def need_bytes(nbytes: int) -> int:
    """Peak memory of one size: state, 2 saved copies in tmpfs, dcp staging, ftd's 2 segments, a restore child."""
    return 6 * nbytes + 2 * GIB


def plan_sizes(args: argparse.Namespace) -> tuple[list[int], list[dict[str, str]]]:
    import psutil

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.with_4gib and 4 * GIB not in sizes:
        sizes.append(4 * GIB)
    keep, skipped = [], []
    avail = psutil.virtual_memory().available
    for n in sizes:
        if need_bytes(n) > avail:
            reason = (f"needs about {need_bytes(n) / GIB:.1f} GiB (6x state + 2 GiB), "
                      f"{avail / GIB:.1f} GiB available (psutil)")
            log(f"skipping size {fmt_size(n)}: {reason}")
            skipped.append({"size": fmt_size(n), "reason": reason})
        else:
            keep.append(n)
    return keep, skipped


def run(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint.*")

    from ftd.bench import loop, scaling, suite
    from ftd.bench.methods import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    machine = machine_info(args.device)
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB RAM "
        f"({machine['available_gib_at_start']:.1f} available), torch {machine['torch']}, device {args.device}")
    sizes, skipped = plan_sizes(args)
    doc: dict[str, Any] = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
                           "args": vars(args).copy(), "sizes": [], "skipped_sizes": skipped, "notes": []}
    doc["args"].pop("func", None)
    ws = Workspace.create(args.disk_dir)
    try:
        for n in sizes:
            doc["sizes"].append(suite.run_size(n, methods, args, ws))
        if not args.no_loop:
            doc["loop"] = loop.run_loop(args, ws)
        if not args.no_scaling:
            counts = [int(c) for c in args.scale_nodes.split(",") if c.strip()]
            doc["scaling"] = scaling.run_scaling(counts, args.scale_mib, args.scale_timeout)
    finally:
        ws.remove()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    doc["notes"] += [
        "dcp and torchsnapshot write to /dev/shm (the same tmpfs ftd's daemon uses), so the comparison "
        "is memory against memory; torch.save -> disk is the usual default and its 'until complete' includes fsync.",
        f"restore: {'a fresh Python process per method, timing only the restore calls (the first one also allocates the optimizer state)' if args.restore == 'subprocess' else 'in this process, into a fresh model/optimizer'}; "
        "memcpy restores by copying back in-process. torch.load from disk reads from the page cache (just written).",
        "peak RSS: highest RSS of this process plus its children (dcp's checkpoint process) during the method, "
        "over the RSS before it; ftd's daemon is reported separately (its RSS counts the shm pages it touched).",
        f"torch threads {torch.get_num_threads()}; the simulated compute and the background copies share the cores.",
    ]
    return doc


def write_outputs(doc: dict[str, Any], out_dir: Path, tag: str, plots: bool) -> dict[str, Path]:
    from ftd.bench import report

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"compare-{datetime.date.today().isoformat()}{tag}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    if plots:
        doc["plots"] = [p.name for p in report.plots(doc, stem)]
        paths.update({f"png{i}": stem.with_name(n) for i, n in enumerate(doc["plots"])})
    paths["md"].write_text(report.markdown(doc))
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return paths


def cmd_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print(f"--device {args.device}: no CUDA device here (torch {torch.__version__}, "
                  f"cuda build {torch.version.cuda}); nothing to run.", flush=True)
            return 0
        args.restore_timeout = max(args.restore_timeout, 120)
    t0 = time.perf_counter()
    doc = run(args)
    doc["total_s"] = time.perf_counter() - t0
    paths = write_outputs(doc, Path(args.out_dir), args.tag, not args.no_plots)
    log(f"whole run {doc['total_s']:.0f} s")
    for p in paths.values():
        print(p, flush=True)
    return 0


def add_parser(sub: Any) -> None:
    """Add `bench` to an argparse subparsers object (ftd/cli.py calls this)."""
    p = sub.add_parser("bench", help="compare ftd with torch.save, dcp, torchsnapshot and memcpy",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftd bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
