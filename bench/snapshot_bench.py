"""Snapshot benchmark: ftd's stall, copy throughput and restore time against memcpy and torch.save/load.

    python bench/snapshot_bench.py [--gib 1] [--repeats 5] [--compute-s 0.4]

A real `ftd daemon` runs as a separate process (shared memory under a fresh /dev/shm directory);
this process holds a training state of about `--gib` GiB (fp32 parameters of a few large
nn.Linear layers plus AdamW's exp_avg and exp_avg_sq) and an `ftd.Snapshotter`. Measured, all in
the same run:

* stall: what `optimizer.step()` waits for the copy, with a simulated forward/backward (matmuls)
  between `snapshot()` and the next step, and with nothing in between (the worst case);
* copy throughput: the Snapshotter's copy of the state into shm vs a plain `Tensor.copy_` of the
  same tensors into an already-touched buffer (memcpy);
* synchronous `torch.save` of the same state to /dev/shm and to disk;
* restore: `Snapshotter.restore()` into a second model/optimizer vs `torch.load(weights_only=True)`
  + `load_state_dict` from /dev/shm and from disk (page cache warm, and evicted with
  posix_fadvise(DONTNEED)).

Prints a table (metric, value, target, pass/fail) and writes bench/results/snapshot-<date>.json.
The daemon, its shm files and the temporary files are removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

import ftd
from ftd.bench import common
from ftd.bench.common import (GIB, MATMUL_DIM, Compute, Row, build_optimizer, gbps, log, machine_info, median,
                              nbytes_of)
from ftd.demo.procs import DaemonProcess, ftd_env

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
ALIGN = 64

# targets
TARGET_COPY_VS_MEMCPY = 0.8
TARGET_STALL_VS_SAVE = 0.05
TARGET_RESTORE_SPEEDUP = 5.0


def build_model(gib: float, layers: int) -> nn.Sequential:
    """`layers` square nn.Linear layers whose params + AdamW state come to about `gib` GiB."""
    return common.build_model(int(gib * GIB), layers)


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of model and optimizer state (what a snapshot has to copy)."""
    tensors = [p.detach() for p in model.parameters()]
    for st in opt.state.values():
        tensors.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return tensors


def compare_states(model_a: nn.Module, opt_a: torch.optim.Optimizer, model_b: nn.Module,
                   opt_b: torch.optim.Optimizer) -> list[str]:
    """Names of the tensors that differ (bit for bit) between two model/optimizer pairs."""
    bad = [name for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items())
           if not torch.equal(a, b)]
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    if set(sa) != set(sb):
        return bad + ["optimizer state keys"]
    for idx in sa:
        for key, va in sa[idx].items():
            vb = sb[idx].get(key)
            if not isinstance(vb, torch.Tensor) or not torch.equal(va, vb):
                bad.append(f"optim/{idx}/{key}")
    return bad


# ---- the simulated forward/backward ------------------------------------------------------------


# ---- the daemon --------------------------------------------------------------------------------


@dataclass
class Workspace:
    """Temporary directories: `tmp` (socket, daemon log, disk checkpoints) on disk, `shm` on /dev/shm."""

    tmp: Path
    shm: Path

    @classmethod
    def create(cls, disk_dir: str | None) -> Workspace:
        tmp = Path(tempfile.mkdtemp(prefix="ftd-bench-", dir=disk_dir))
        shm = Path(tempfile.mkdtemp(prefix="ftd-bench-", dir="/dev/shm"))
        return cls(tmp, shm)

    def remove(self) -> None:
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def running_daemon(ws: Workspace, job: str) -> Iterator[dict[str, str]]:
    """An `ftd daemon` process for `job`, segments under ws.shm; stopped (then killed) on exit."""
    env = ftd_env(ws.tmp, job, FTD_SHM_DIR=str(ws.shm / "segments"), FTD_MEMORY_RESERVE="0", FTD_KEEP="2",
                  FTD_LOG_LEVEL="INFO")
    daemon = DaemonProcess(env, ws.tmp / "daemon.log")
    try:
        daemon.start()
        log(f"daemon pid {daemon.proc.pid if daemon.proc else '?'} serving unix:{env['FTD_SOCKET']}, "
            f"segments in {ws.shm / 'segments'}")
        yield env
    finally:
        stop_daemon(daemon)


def stop_daemon(daemon: DaemonProcess) -> None:
    try:
        daemon.stop()
    except subprocess.TimeoutExpired:
        daemon.kill(signal.SIGKILL)
    except Exception:  # never leave a daemon behind
        daemon.kill(signal.SIGKILL)
        raise


# ---- the measurements --------------------------------------------------------------------------


@dataclass
class Results:
    raw: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: Any) -> None:
        self.raw[key] = value


def train_iteration(compute: Compute, opt: torch.optim.Optimizer, snap: Any | None, step: int) -> tuple[float, float]:
    """compute -> optimizer.step (waits for the copy of the previous snapshot) -> snapshot.

    Returns (compute seconds, whole iteration seconds).
    """
    t0 = time.perf_counter()
    spent = compute.timed()
    opt.step()
    if snap is not None:
        snap.snapshot(step)
    return spent, time.perf_counter() - t0


def measure_stall_with_compute(snap: Any, opt: torch.optim.Optimizer, compute: Compute, warmup: int,
                               repeats: int, res: Results, step: int) -> int:
    """Warm-up (segments get allocated), then iterations without and with snapshots; returns the next step."""
    log(f"warm-up: {warmup} iterations (first snapshots map the segments prepared ahead)")
    snap.snapshot(step)
    step += 1
    for _ in range(warmup):
        train_iteration(compute, opt, snap, step)
        step += 1
    res.put("warmup_stalls_s", list(snap.stats.stalls_s))
    log(f"warm-up stalls: {fmt_list(list(snap.stats.stalls_s))} s")
    snap.wait()
    log(f"{repeats} iterations of compute ({compute.count} matmuls) + step, no snapshots")
    plain = [train_iteration(compute, opt, None, step + i) for i in range(repeats)]
    n_before = len(snap.stats.stalls_s)
    log(f"{repeats} iterations of compute + step + snapshot")
    timed = []
    for _ in range(repeats):
        timed.append(train_iteration(compute, opt, snap, step))
        step += 1
    timed.append(train_iteration(compute, opt, None, step))  # its step() measures the last snapshot's stall
    stalls = list(snap.stats.stalls_s)[n_before:]
    res.put("stall_compute_s", stalls)
    res.put("compute_in_loop_s", [c for c, _ in timed])
    res.put("iter_plain_s", [it for _, it in plain])
    res.put("iter_snap_s", [it for _, it in timed])
    log(f"stalls: {fmt_list(stalls)} s; compute {fmt_list([c for c, _ in timed])} s; iteration "
        f"{fmt_list([it for _, it in timed])} s vs {fmt_list([it for _, it in plain])} s without snapshots")
    snap.wait()
    return step


def measure_stall_no_compute(snap: Any, opt: torch.optim.Optimizer, repeats: int, res: Results, step: int) -> int:
    """snapshot() then optimizer.step() at once: the stall is the whole copy (previous snapshot sealed first)."""
    log(f"stall with no compute between snapshot and step: {repeats} iterations")
    stalls = []
    for _ in range(repeats):
        snap.wait()
        snap.snapshot(step)
        opt.step()
        stalls.append(snap.stats.last_stall_s)
        step += 1
    snap.wait()
    res.put("stall_nocompute_s", stalls)
    log(f"stalls: {fmt_list(stalls)} s")
    return step


class Memcpy:
    """The baseline: copy the state tensors into one preallocated, already-touched buffer (ftd's
    64-byte-aligned layout) with `Tensor.copy_`, on a long-lived background thread like ftd's copier."""

    def __init__(self, tensors: list[torch.Tensor]):
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-(t.numel() * t.element_size()) // ALIGN) * ALIGN
        self.dst = torch.empty(total, dtype=torch.uint8)
        self.dst.fill_(1)  # first touch happens here, not in the timed copies
        self.pairs = [(self.dst[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape), t)
                      for o, t in zip(offsets, tensors)]
        self.nbytes = nbytes_of(tensors)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-memcpy")

    def _copy(self) -> float:
        t0 = time.perf_counter()
        for dst, src in self.pairs:
            dst.copy_(src)
        return time.perf_counter() - t0

    def timed(self) -> float:
        return self.pool.submit(self._copy).result()

    def close(self) -> None:
        self.pool.shutdown()
        self.pairs, self.dst = [], torch.empty(0)


def measure_copy(snap: Any, memcpy: Memcpy, repeats: int, res: Results, step: int) -> int:
    """Interleaved: a memcpy of the state, then snapshot() and wait until sealed, nothing else running."""
    log(f"copy throughput: {repeats} rounds of memcpy baseline, then a snapshot waited until sealed")
    memcpy.timed()  # warm the thread
    copies, sealed_s, memcpys = [], [], []
    for _ in range(repeats):
        memcpys.append(memcpy.timed())
        snap.wait()
        before = snap.stats.sealed
        t0 = time.perf_counter()
        snap.snapshot(step)
        snap.wait()
        sealed_s.append(time.perf_counter() - t0)
        if snap.stats.sealed != before + 1:
            raise RuntimeError(f"snapshot of step {step} was not sealed: {dict(snap.stats.skip_reasons)}")
        copies.append(snap.stats.last_copy_s)
        step += 1
    res.put("copy_s", copies)
    res.put("sealed_s", sealed_s)
    res.put("snapshot_bytes", snap.stats.last_bytes)
    res.put("memcpy_s", memcpys)
    res.put("memcpy_bytes", memcpy.nbytes)
    log(f"memcpy: {fmt_list(memcpys)} s of {memcpy.nbytes / 2**30:.3f} GiB")
    log(f"ftd copy: {fmt_list(copies)} s; snapshot->sealed: {fmt_list(sealed_s)} s "
        f"({snap.stats.last_bytes / 2**30:.3f} GiB)")
    return step


def drop_from_page_cache(path: Path) -> None:
    """Write back and evict `path`'s pages (works without root for a file we own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_torch_save(model: nn.Module, opt: torch.optim.Optimizer, paths: dict[str, Path], repeats: int,
                       res: Results) -> None:
    """Synchronous torch.save of model + optimizer state_dicts to each path; disk also with fsync."""
    for where, path in paths.items():
        log(f"torch.save -> {where} ({path}): {repeats} times")
        saves, fsyncs = [], []
        for _ in range(repeats):
            path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
            saves.append(time.perf_counter() - t0)
            if where == "disk":
                t1 = time.perf_counter()
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                fsyncs.append(saves[-1] + time.perf_counter() - t1)
        res.put(f"torch_save_{where}_s", saves)
        if fsyncs:
            res.put("torch_save_disk_fsync_s", fsyncs)
        log(f"torch.save {where}: {fmt_list(saves)} s" + (f"; with fsync {fmt_list(fsyncs)} s" if fsyncs else ""))


def timed_restore(snap2: Any) -> float:
    t0 = time.perf_counter()
    step = snap2.restore()
    elapsed = time.perf_counter() - t0
    if step == 0:
        raise RuntimeError("Snapshotter.restore() found nothing to restore")
    return elapsed


def timed_torch_load(model2: nn.Module, opt2: torch.optim.Optimizer, path: Path, cold: bool) -> float:
    if cold:
        drop_from_page_cache(path)
    t0 = time.perf_counter()
    sd = torch.load(path, weights_only=True)
    model2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    return time.perf_counter() - t0


def measure_restores(snap2: Any, model2: nn.Module, opt2: torch.optim.Optimizer, paths: dict[str, Path],
                     repeats: int, res: Results) -> None:
    """Snapshotter.restore() vs torch.load(weights_only=True) + load_state_dict, interleaved per repeat.

    Interleaving gives every method the same allocator and page-cache history (each one allocates
    its optimizer state afresh: restore clones it out of the segment, torch.load reads it into new
    storages). The disk file is read with the page cache warm and after posix_fadvise(DONTNEED).
    """
    cases: dict[str, Callable[[], float]] = {
        "restore": lambda: timed_restore(snap2),
        "torch_load_shm": lambda: timed_torch_load(model2, opt2, paths["shm"], cold=False),
        "torch_load_disk": lambda: timed_torch_load(model2, opt2, paths["disk"], cold=False),
        "torch_load_disk_cold": lambda: timed_torch_load(model2, opt2, paths["disk"], cold=True),
    }
    log(f"restore vs torch.load (shm, disk warm, disk evicted), interleaved: {repeats} rounds")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            times[name].append(fn())
        log(f"round {r + 1}: " + ", ".join(f"{name} {ts[-1]:.3f} s" for name, ts in times.items()))
    for name, ts in times.items():
        res.put(f"{name}_s", ts)


# ---- the report --------------------------------------------------------------------------------


def fmt_list(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def summarize(r: dict[str, Any]) -> list[Row]:
    nbytes = r["snapshot_bytes"]
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    stall = median(r["stall_compute_s"])
    save_shm, save_disk = median(r["torch_save_shm_s"]), median(r["torch_save_disk_s"])
    copy, memcpy = median(r["copy_s"]), median(r["memcpy_s"])
    ratio = gbps(nbytes, copy) / gbps(r["memcpy_bytes"], memcpy)
    restore = median(r["restore_s"])
    load_disk, load_cold = median(r["torch_load_disk_s"]), median(r["torch_load_disk_cold_s"])
    return [
        Row("state size (params + AdamW state)", f"{nbytes / 2**30:.3f} GiB ({r['params'] / 1e6:.1f}M params)"),
        Row("simulated fwd/bwd: alone / in loop (median)",
            f"{r['compute_alone_s']:.3f} s / {median(r['compute_in_loop_s']):.3f} s"),
        Row("iteration (fwd/bwd + step): no snapshots / snapshot each (median)",
            f"{median(r['iter_plain_s']):.3f} s / {median(r['iter_snap_s']):.3f} s"),
        Row("stall per snapshot, with compute: median", ms(stall)),
        Row("stall per snapshot, with compute: min / max",
            f"{ms(min(r['stall_compute_s']))} / {ms(max(r['stall_compute_s']))}"),
        Row("stall, warm-up snapshots (segments prepared ahead)",
            " / ".join(f"{s * 1e3:.0f}" for s in r["warmup_stalls_s"]) + " ms"),
        Row("stall, no compute between snapshot and step: median", ms(median(r["stall_nocompute_s"]))),
        Row("  ... as % of torch.save to /dev/shm (worst case)",
            f"{median(r['stall_nocompute_s']) / save_shm * 100:.1f} %"),
        Row("stall / torch.save to /dev/shm", f"{stall / save_shm * 100:.2f} %", f"<= {TARGET_STALL_VS_SAVE:.0%}",
            stall / save_shm <= TARGET_STALL_VS_SAVE),
        Row("stall / torch.save to disk", f"{stall / save_disk * 100:.2f} %", f"<= {TARGET_STALL_VS_SAVE:.0%}",
            stall / save_disk <= TARGET_STALL_VS_SAVE),
        Row("ftd copy into shm (median)", f"{ms(copy)} = {gbps(nbytes, copy):.1f} GB/s"),
        Row("memcpy of the same tensors, touched buffer (median)",
            f"{ms(memcpy)} = {gbps(r['memcpy_bytes'], memcpy):.1f} GB/s"),
        Row("ftd copy / memcpy throughput (medians)", f"{ratio:.2f}", f">= {TARGET_COPY_VS_MEMCPY}",
            ratio >= TARGET_COPY_VS_MEMCPY),
        Row("ftd copy / memcpy throughput (best of each)",
            f"{gbps(nbytes, min(r['copy_s'])) / gbps(r['memcpy_bytes'], min(r['memcpy_s'])):.2f}"),
        Row("snapshot() -> sealed in daemon (copy+checksum+commit)", ms(median(r["sealed_s"]))),
        Row("torch.save -> /dev/shm (median)", f"{save_shm:.3f} s"),
        Row("torch.save -> disk, page cache (median)", f"{save_disk:.3f} s"),
        Row("torch.save -> disk + fsync (median)", f"{median(r['torch_save_disk_fsync_s']):.3f} s"),
        Row("Snapshotter.restore(), first into a fresh optimizer", f"{r['restore_first_s']:.3f} s"),
        Row("Snapshotter.restore() (median; verify + load)", f"{restore:.3f} s"),
        Row("torch.load+load_state_dict <- /dev/shm (median)", f"{median(r['torch_load_shm_s']):.3f} s"),
        Row("torch.load+load_state_dict <- disk, page cache warm", f"{load_disk:.3f} s"),
        Row("torch.load+load_state_dict <- disk, evicted (fadvise)", f"{load_cold:.3f} s"),
        Row("restore speed-up vs torch.load from /dev/shm", f"{median(r['torch_load_shm_s']) / restore:.1f}x"),
        Row("restore speed-up vs torch.load from disk (warm cache)", f"{load_disk / restore:.1f}x",
            f">= {TARGET_RESTORE_SPEEDUP:.0f}x", load_disk / restore >= TARGET_RESTORE_SPEEDUP),
        Row("restore speed-up vs torch.load from disk (evicted)", f"{load_cold / restore:.1f}x",
            f">= {TARGET_RESTORE_SPEEDUP:.0f}x", load_cold / restore >= TARGET_RESTORE_SPEEDUP),
        Row("restore bit-exact (every param and AdamW tensor)", "yes" if not r["restore_mismatches"] else
            f"NO: {r['restore_mismatches'][:3]}", "yes", not r["restore_mismatches"]),
        Row("snapshots skipped", str(r["skipped"]), "0", r["skipped"] == 0),
    ]


def render(rows: list[Row], machine: dict[str, Any]) -> str:
    header = ("metric", "value", "target", "result")
    cells = [header] + [(r.metric, r.value, r.target, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    out = [f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB RAM, "
           f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}, "
           f"load average at start {machine['loadavg_at_start'][0]:.2f}", line]
    for i, c in enumerate(cells):
        out.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if i == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)



def check_memory(gib: float) -> None:
    """Refuse to start when the run would not fit: state x2, 3 segments, memcpy buffer, save files."""
    need = int(gib * (1 << 30) * 9)
    avail = psutil.virtual_memory().available
    if avail < need:
        raise SystemExit(f"not enough memory for --gib {gib}: need about {need / 2**30:.1f} GiB, "
                         f"{avail / 2**30:.1f} GiB available")


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    res = Results()
    machine = machine_info()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB RAM, "
        f"torch threads {machine['torch_threads']}, load average {machine['loadavg_at_start'][0]:.2f}")
    if machine["loadavg_at_start"][0] > 0.5:
        log("warning: the machine is busy (load average above 0.5); timings will be noisy")
    torch.manual_seed(0)
    ws = Workspace.create(args.disk_dir)
    job = f"bench-{uuid.uuid4().hex[:8]}"
    snap = snap2 = None
    try:
        with running_daemon(ws, job) as env:
            log(f"building a ~{args.gib} GiB training state ({args.layers} nn.Linear layers + AdamW)")
            t0 = time.perf_counter()
            model = build_model(args.gib, args.layers)
            opt = build_optimizer(model)
            tensors = state_tensors(model, opt)
            res.put("params", sum(p.numel() for p in model.parameters()))
            log(f"built {nbytes_of(tensors) / 2**30:.3f} GiB in {time.perf_counter() - t0:.1f} s")
            compute = Compute(args.compute_s)
            compute.calibrate()
            res.put("compute_alone_s", compute.alone_s)
            res.put("compute_matmuls", compute.count)
            log(f"simulated forward/backward: {compute.count} matmuls {MATMUL_DIM}^2, {compute.alone_s:.3f} s alone")

            snap = ftd.Snapshotter(model, opt, job=job, socket=env["FTD_SOCKET"], rank=0, world_size=1)
            step = measure_stall_with_compute(snap, opt, compute, args.warmup, args.repeats, res, 1)
            step = measure_stall_no_compute(snap, opt, args.repeats, res, step)
            memcpy = Memcpy(tensors)
            try:
                step = measure_copy(snap, memcpy, args.repeats, res, step)  # last: newest snapshot == live state
            finally:
                memcpy.close()
            res.put("skipped", snap.stats.skipped)
            res.put("skip_reasons", dict(snap.stats.skip_reasons))

            paths = {"shm": ws.shm / "state.pt", "disk": ws.tmp / "state.pt"}
            measure_torch_save(model, opt, paths, args.repeats, res)

            log("building a second model/optimizer of the same shape to restore into")
            model2 = build_model(args.gib, args.layers)
            opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-4)
            snap2 = ftd.Snapshotter(model2, opt2, job=job, socket=env["FTD_SOCKET"], rank=0, world_size=1)
            log("first restore into the fresh model/optimizer (none of its optimizer state exists yet)")
            res.put("restore_first_s", timed_restore(snap2))
            mismatches = compare_states(model, opt, model2, opt2)
            res.put("restore_mismatches", mismatches)
            log(f"first restore {res.raw['restore_first_s']:.3f} s; " +
                ("restored state is bit-exact" if not mismatches else f"restored state DIFFERS: {mismatches[:5]}"))
            measure_restores(snap2, model2, opt2, paths, args.repeats, res)
            snap2.close()
            snap.close()
            snap = snap2 = None
    finally:
        for s in (snap2, snap):
            if s is not None:
                s.close(timeout=10)
        ws.remove()
    return summarize(res.raw), {"machine": machine, "args": vars(args), "raw": res.raw}


def write_json(rows: list[Row], doc: dict[str, Any]) -> Path:
    return common.write_results(RESULTS_DIR / f"snapshot-{datetime.date.today().isoformat()}.json", doc, rows, [
        "disk reads may come from the page cache: 'warm' leaves it, 'evicted' uses "
        "posix_fadvise(DONTNEED) after fsync (the virtual disk may still cache on the host)",
        "compute is simulated with matmuls on the same CPU cores that the copy uses"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="size of params + AdamW state, GiB")
    p.add_argument("--layers", type=int, default=4, help="number of square nn.Linear layers")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int, default=4, help="untimed training iterations first (keep=2 -> 2 segments)")
    p.add_argument("--compute-s", type=float, default=0.4, help="seconds of simulated forward/backward per step")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--disk-dir", default=None, help="directory on disk for the torch.save file (default: $TMPDIR)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.gib <= 0 or args.layers < 1 or args.warmup < 0:
        p.error("--repeats and --layers must be >= 1, --gib > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_memory(args.gib)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, doc = run(args)
    doc["total_s"] = time.perf_counter() - t0
    path = write_json(rows, doc)
    print()
    print(render(rows, doc["machine"]))
    print(f"\nwhole run {doc['total_s']:.0f} s; results in {path}")
    print("note: 'disk, page cache warm' reads come from the page cache; 'evicted' drops the file's pages "
          "with posix_fadvise(DONTNEED) first (the host may still cache the virtual disk).")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
