"""Durable checkpoints in a real training loop: ftd's durable tier against torch.distributed.checkpoint.async_save.

    python bench/durable_bench.py [--state-mb 256] [--every 5] [--rounds 24] [--dir DIR]

One run, one disk directory, one cadence N (`--every`). The same model (an MLP of square nn.Linear
layers, fp32, AdamW; `--state-mb` of parameters + optimizer state) trains with a real
forward/backward/optimizer.step per step under each configuration:

- `none`: no checkpoints (the baseline);
- `ftd`: a real `ftd daemon` process (FTD_DURABLE_DIR, FTD_DURABLE_EVERY=N) and an ftd.Snapshotter that
  snapshots every step, as ftd is used; the daemon writes every N-th step from its memory to disk;
- `ftd_cadence`: a second daemon, the same settings, snapshots only at the cadence steps;
- `dcp_thread` / `dcp_process`: `dcp.async_save` every N steps with the thread (default) and the process
  checkpointer, default stager, the loop waiting for the previous save before it starts the next;
- `raw_io` (reference): a thread writes + fsyncs the bytes of one durable step every N steps.

Interleaving. Every configuration is live for the whole run (two daemons, dcp's checkpoint process);
a round runs one *unit* of each, in a shuffled order: N training steps, the checkpoint taken at the
start of the first one (the state after the previous step), ftd snapshots at the start of every step
(so each copy overlaps that step's forward/backward inside the unit). At the end of a unit the loop
pays what it would pay before the next checkpoint in steady state (the timed "charged drain": dcp's
future, the raw thread, ftd's last commit RPC), then background work that never blocks training
(ftd's disk write) is waited for untimed, so no unit's work spills into another's. Loop overhead =
(mean step time - the baseline's) / the baseline's, over every unit; its 95% interval comes from
the per-round paired differences, which cancel the drift of a shared machine.

Seal -> durable: deltas of the daemons' ftd_seal_to_durable_seconds and ftd_durable_write_seconds
(_sum/_count, scraped around every unit) and the commit markers (committed_at - the index's
created_at), against `raw_io`'s write + fsync of the same bytes into the same directory during
training, and, at the end, one more cadence step per daemon and raw writes with nothing else running.
Writes durable-<date><tag>.json into --out-dir.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from ftd.bench.common import MIB, log, machine_info, path_bytes
from ftd.bench.methods import availability, ensure_process_group, stop_dcp_process

CONFIGS: dict[str, str] = {
    "none": "no checkpoints",
    "ftd": "ftd: snapshot every step, durable every N",
    "ftd_cadence": "ftd: snapshot + durable every N only",
    "dcp_thread": "dcp.async_save, thread, every N",
    "dcp_process": "dcp.async_save, process, every N",
    "raw_io": "reference: raw write+fsync thread every N",
}
DCP_KEYS = ("dcp_thread", "dcp_process")
FTD_KEYS = ("ftd", "ftd_cadence")
RAW_CHUNK = 16 * MIB
LOOP_TARGET = 0.1  # ftd's loop overhead / the best dcp.async_save's
SEAL_TARGET = 1.3  # ftd's seal -> durable / raw write + fsync
WAIT_S = 300.0


def make_model(state_bytes: int, layers: int) -> nn.Sequential:
    """`layers` x (Linear(dim, dim) + GELU) whose fp32 params + AdamW state come to about `state_bytes`."""
    dim = max(8, int((state_bytes / 12 / layers) ** 0.5))
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(dim, dim), nn.GELU()]
    return nn.Sequential(*mods)


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (from /proc/mounts; 'unknown' elsewhere)."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, typ, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, typ
    except OSError:
        pass
    return kind


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the physical reference --------------------------------------------------------------------


def raw_write(directory: Path, data: memoryview) -> float:
    """Seconds to create a file in `directory`, write `data` in 16 MiB chunks, fsync, close, fsync the
    directory; the file is removed afterwards (untimed)."""
    path = directory / f"raw-{uuid.uuid4().hex[:8]}.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for at in range(0, len(data), RAW_CHUNK):
            chunk = data[at:at + RAW_CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def raw_sendfile(directory: Path, source: Path, nbytes: int) -> float:
    """`raw_write`, the bytes coming from the file `source` (on /dev/shm) through os.sendfile (what ftd's
    writer did before it wrote from a mapping of the segment)."""
    path = directory / f"raw-{uuid.uuid4().hex[:8]}.bin"
    src = os.open(source, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            done = 0
            while done < nbytes:
                sent = os.sendfile(fd, src, done, min(RAW_CHUNK, nbytes - done))
                if sent <= 0:
                    raise RuntimeError(f"{source} ended at {done} bytes")
                done += sent
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        seconds = time.perf_counter() - t0
    finally:
        os.close(src)
    path.unlink()
    return seconds


# ---- the configurations ------------------------------------------------------------------------


class Config:
    """One configuration, live for the whole run. A unit calls `before_step` at the start of each of its
    N steps, then `charged_drain` (timed: the loop pays it) and `untimed_drain` (never blocks training)."""

    def __init__(self, key: str):
        self.key, self.label = key, CONFIGS[key]

    def before_step(self, step: int, first: bool) -> None:
        pass

    def charged_drain(self) -> dict[str, Any]:
        return {}

    def untimed_drain(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Ftd(Config):
    """A real `ftd daemon` with a durable tier and a Snapshotter of the trainer's model and optimizer."""

    def __init__(self, key: str, stack: ExitStack, base: Path, model: nn.Module, opt: torch.optim.Optimizer,
                 every: int):
        import ftd
        from ftd.bench.common import stop_daemon
        from ftd.demo.procs import DaemonProcess, free_port, ftd_env

        super().__init__(key)
        self.every, self.job = every, f"durable-{key}-{uuid.uuid4().hex[:6]}"
        work, durable = base / "work" / key, base / "ckpt" / key
        work.mkdir(parents=True)
        shm = Path(tempfile.mkdtemp(prefix="ftd-durable-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        stack.callback(shutil.rmtree, shm, True)
        self.port = free_port()
        self.env = ftd_env(work, self.job, FTD_SHM_DIR=str(shm), FTD_DURABLE_DIR=str(durable),
                           FTD_DURABLE_EVERY=str(every), FTD_METRICS_PORT=str(self.port),
                           FTD_METRICS_ADDRESS="127.0.0.1", FTD_LOG_LEVEL="INFO")
        self.daemon = DaemonProcess(self.env, work / "daemon.log").start()
        stack.callback(stop_daemon, self.daemon)
        self.snap = ftd.Snapshotter(model, opt, job=self.job, socket=self.env["FTD_SOCKET"], rank=0, world_size=1)
        stack.callback(self.snap.close, 30)
        self.root = durable / self.job
        self.cadence_step = -1
        self.last = self.scrape()

    def scrape(self) -> dict[str, float]:
        from ftd.demo.cluster import Metrics

        m = Metrics.scrape(self.port)
        out = {n: m.value(n) for n in ("ftd_seal_to_durable_seconds_sum", "ftd_seal_to_durable_seconds_count",
                                       "ftd_durable_write_seconds_sum", "ftd_durable_write_seconds_count",
                                       "ftd_durable_bytes_total")}
        for outcome in ("written", "committed", "skipped", "failed"):
            out[f"steps_{outcome}"] = m.value("ftd_durable_steps_total", outcome=outcome)
        out["thread_errors"] = m.value("ftd_thread_errors_total")
        return out

    def before_step(self, step: int, first: bool) -> None:
        if first:
            self.cadence_step = step
        if first or self.key == "ftd":
            self.snap.snapshot(step)

    def charged_drain(self) -> dict[str, Any]:
        self.snap.wait(WAIT_S)  # the last snapshot's checksums and Commit; its copy was waited for in the unit
        return {}

    def untimed_drain(self) -> dict[str, Any]:
        """Wait for the unit's cadence step to be committed; its figures from the metrics and the marker."""
        from ftd.durable import layout
        from ftd.durable.reader import DurableStep, committed_steps

        t0 = time.monotonic()
        while self.cadence_step not in committed_steps(self.root):
            if time.monotonic() - t0 > WAIT_S:
                raise RuntimeError(f"{self.key}: step {self.cadence_step} not durable after {WAIT_S:.0f} s")
            time.sleep(0.005)
        waited = time.monotonic() - t0
        now = self.scrape()  # the daemon observes the histogram just after it writes the marker: wait for it
        while now["ftd_seal_to_durable_seconds_count"] <= self.last["ftd_seal_to_durable_seconds_count"]:
            if time.monotonic() - t0 > WAIT_S:
                raise RuntimeError(f"{self.key}: ftd_seal_to_durable_seconds did not count step {self.cadence_step}")
            time.sleep(0.005)
            now = self.scrape()
        d = {k: now[k] - self.last[k] for k in now}
        self.last = now
        opened = DurableStep.open(self.root, self.cadence_step)
        marker = json.loads((opened.path / layout.COMMIT).read_bytes())
        with self.snap.stats.lock:
            stalls = list(self.snap.stats.stalls_s)
        return {"durable_wait_s": waited, "metric_deltas": d,
                "seal_to_durable_s": d["ftd_seal_to_durable_seconds_sum"] / max(d["ftd_seal_to_durable_seconds_count"], 1),
                "durable_write_s": d["ftd_durable_write_seconds_sum"] / max(d["ftd_durable_write_seconds_count"], 1),
                "marker_seal_to_commit_s": float(marker["committed_at"]) - opened.index.created_at,
                "durable_step_bytes": path_bytes(opened.path), "last_stall_s": stalls[-1] if stalls else 0.0}

    def stats(self) -> dict[str, Any]:
        s = self.snap.stats
        with s.lock:
            return {"sealed": s.sealed, "skipped": s.skipped, "skip_reasons": dict(s.skip_reasons),
                    "stalls_s": list(s.stalls_s)}

    def idle(self) -> dict[str, Any]:
        """One more cadence step with nothing else running."""
        step = (self.cadence_step // self.every + 1) * self.every
        self.before_step(step, True)
        self.snap.wait(WAIT_S)
        return self.untimed_drain()


class Dcp(Config):
    """dcp.async_save of get_state_dict(model, optimizer), thread or process checkpointer, default stager."""

    def __init__(self, key: str, stack: ExitStack, base: Path, model: nn.Module, opt: torch.optim.Optimizer):
        super().__init__(key)
        ensure_process_group()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.dcp, self.get_state_dict, self.model, self.opt = dcp, get_state_dict, model, opt
        self.typ = AsyncCheckpointerType.PROCESS if key == "dcp_process" else AsyncCheckpointerType.THREAD
        self.dir = base / "ckpt" / key
        self.dir.mkdir(parents=True)
        if key == "dcp_process":
            stack.callback(stop_dcp_process)
        self.pending: Any = None
        self.path: Path | None = None
        self.called = self.done = 0.0
        self.previous: Path | None = None

    def before_step(self, step: int, first: bool) -> None:
        if not first:
            return
        self.path = self.dir / f"step-{step:012d}"
        msd, osd = self.get_state_dict(self.model, self.opt)
        self.called, self.done = time.monotonic(), 0.0
        fut = self.dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(self.path),
                                  async_checkpointer_type=self.typ)
        self.pending = getattr(fut, "upload_completion", fut)
        self.pending.add_done_callback(lambda _f: setattr(self, "done", time.monotonic()))

    def charged_drain(self) -> dict[str, Any]:
        self.pending.result()  # where the next async_save would wait for it
        return {}

    def untimed_drain(self) -> dict[str, Any]:
        while not self.done:  # the done callback runs just after result() returns
            time.sleep(0.001)
        out = {"call_to_done_s": self.done - self.called, "bytes": path_bytes(self.path)}  # type: ignore[arg-type]
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)  # keep two, like ftd's durable_keep
        self.previous = self.path
        return out


class RawIo(Config):
    """A thread that writes + fsyncs one durable step's bytes into the same directory: pure I/O, no staging."""

    def __init__(self, key: str, base: Path, nbytes: int):
        super().__init__(key)
        self.dir = base / "ckpt" / key
        self.dir.mkdir(parents=True)
        self.data = torch.empty(nbytes, dtype=torch.uint8).random_()
        self.view = memoryview(self.data.numpy()).cast("B")
        self.thread: threading.Thread | None = None
        self.seconds = 0.0

    def before_step(self, step: int, first: bool) -> None:
        if first:
            self.thread = threading.Thread(target=self._write, name="bench-raw", daemon=True)
            self.thread.start()

    def _write(self) -> None:
        self.seconds = raw_write(self.dir, self.view)

    def charged_drain(self) -> dict[str, Any]:
        self.thread.join()  # type: ignore[union-attr]
        return {}

    def untimed_drain(self) -> dict[str, Any]:
        return {"write_s": self.seconds}


def helper_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each descendant of this process (daemons, dcp's process) by pid."""
    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            out[child.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


# ---- the loop ----------------------------------------------------------------------------------


class Trainer:
    """The model, optimizer and one fixed batch; `unit` trains N steps under a configuration."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(0)
        self.model = make_model(int(args.state_mb * MIB), args.layers)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.dim = self.model[0].in_features
        self.x, self.y = torch.randn(args.batch, self.dim), torch.randn(args.batch, self.dim)
        self.params = sum(q.numel() for q in self.model.parameters())
        self.every = args.every

    def step(self) -> float:
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def unit(self, cfg: Config, index: int) -> dict[str, Any]:
        """N steps, the checkpoint at the start of the first, numbered index * N ..; then the drains."""
        times, call = [], 0.0
        cpu0, helpers0 = psutil.Process().cpu_times(), helper_cpu()
        for j in range(self.every):
            t0 = time.perf_counter()
            cfg.before_step(index * self.every + j, j == 0)
            t1 = time.perf_counter()
            loss = self.step()
            times.append(time.perf_counter() - t0)
            if j == 0:
                call = t1 - t0
        t0 = time.perf_counter()
        cfg.charged_drain()
        charged = time.perf_counter() - t0
        cpu1 = psutil.Process().cpu_times()
        t0 = time.perf_counter()
        row = cfg.untimed_drain()
        row.update(step_s=times, ckpt_call_s=call, charged_drain_s=charged, untimed_drain_s=time.perf_counter() - t0,
                   unit_s=sum(times) + charged, mean_step_s=(sum(times) + charged) / len(times), loss=loss,
                   trainer_cpu_s=(cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
                   helper_cpu_s=sum(v - helpers0.get(pid, 0.0) for pid, v in helper_cpu().items()))
        gc.collect()
        return row


# ---- statistics and the report ------------------------------------------------------------------


def summarize(units: list[dict[str, Any]], idle: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    rounds = sorted({u["round"] for u in units})
    by = {k: {u["round"]: u for u in units if u["config"] == k} for k in keys}
    base = by["none"]
    loop: dict[str, Any] = {}
    for k in keys:
        rows = by[k]
        m = mean([rows[r]["mean_step_s"] for r in rows])
        b = mean([base[r]["mean_step_s"] for r in rows if r in base])
        diffs = [rows[r]["mean_step_s"] - base[r]["mean_step_s"] for r in rounds if r in rows and r in base]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        cpu = [rows[r]["trainer_cpu_s"] + rows[r]["helper_cpu_s"] - base[r]["trainer_cpu_s"] - base[r]["helper_cpu_s"]
               for r in rounds if r in rows and r in base]
        loop[k] = {"mean_step_s": m, "baseline_mean_step_s": b, "overhead": m / b - 1 if b else float("nan"),
                   "overhead_ci95": 1.96 * sd / math.sqrt(len(diffs)) / b if diffs and b else float("nan"),
                   "median_paired_overhead": statistics.median([d / base[r]["mean_step_s"] for d, r in
                                                                zip(diffs, [r for r in rounds if r in rows and r in base])])
                   if diffs else float("nan"),
                   "units": len(rows), "ckpt_call_mean_s": mean([u["ckpt_call_s"] for u in rows.values()]),
                   "charged_drain_mean_s": mean([u["charged_drain_s"] for u in rows.values()]),
                   "untimed_drain_mean_s": mean([u["untimed_drain_s"] for u in rows.values()]),
                   "trainer_cpu_per_unit_s": mean([u["trainer_cpu_s"] for u in rows.values()]),
                   "helper_cpu_per_unit_s": mean([u["helper_cpu_s"] for u in rows.values()]),
                   "extra_cpu_per_checkpoint_s": mean(cpu),
                   "extra_cpu_ci95_s": 1.96 * statistics.stdev(cpu) / math.sqrt(len(cpu)) if len(cpu) > 1 else 0.0}
    dcp = {k: loop[k]["overhead"] for k in DCP_KEYS if k in loop}
    best = min(dcp, key=dcp.get) if dcp else None
    for k in FTD_KEYS:
        if k in loop and best is not None:
            loop[k]["ratio_to_best_dcp"] = loop[k]["overhead"] / dcp[best] if dcp[best] > 0 else None
    raw_train = [u["write_s"] for u in by.get("raw_io", {}).values()]
    raw = {"training_mean_s": mean(raw_train), "training_s": raw_train,
           "idle_write_median_s": statistics.median(idle["raw_write_s"]) if idle.get("raw_write_s") else float("nan"),
           "idle_write_s": idle.get("raw_write_s", []), "idle_sendfile_s": idle.get("raw_sendfile_s", []),
           "idle_sendfile_median_s": statistics.median(idle["raw_sendfile_s"]) if idle.get("raw_sendfile_s")
           else float("nan")}
    seal: dict[str, Any] = {}
    for k in FTD_KEYS:
        rows = list(by.get(k, {}).values())
        if not rows:
            continue
        deltas = [u["metric_deltas"] for u in rows]
        count = sum(d["ftd_seal_to_durable_seconds_count"] for d in deltas)
        f = {"seal_to_durable_mean_s": sum(d["ftd_seal_to_durable_seconds_sum"] for d in deltas) / max(count, 1),
             "count": count,
             "write_mean_s": sum(d["ftd_durable_write_seconds_sum"] for d in deltas)
             / max(sum(d["ftd_durable_write_seconds_count"] for d in deltas), 1),
             "marker_seal_to_commit_mean_s": mean([u["marker_seal_to_commit_s"] for u in rows]),
             "durable_wait_after_unit_mean_s": mean([u["durable_wait_s"] for u in rows]),
             "skipped": sum(d["steps_skipped"] for d in deltas), "failed": sum(d["steps_failed"] for d in deltas),
             "durable_step_bytes": rows[-1]["durable_step_bytes"]}
        if k in idle:
            st = idle[k]["snapshot_stats"]
            f.update(stall_mean_s=mean(st["stalls_s"]), stall_max_s=max(st["stalls_s"], default=0.0),
                     snapshots_sealed=st["sealed"], snapshots_skipped=st["skipped"])
        f["ratio_to_raw_training"] = f["seal_to_durable_mean_s"] / raw["training_mean_s"]
        if k in idle:
            f["idle_seal_to_durable_s"] = idle[k]["seal_to_durable_s"]
            f["idle_write_s"] = idle[k]["durable_write_s"]
            f["idle_ratio_to_raw"] = f["idle_seal_to_durable_s"] / raw["idle_write_median_s"]
            f["idle_ratio_to_sendfile"] = f["idle_seal_to_durable_s"] / raw["idle_sendfile_median_s"]
        seal[k] = f
    dcp_done = {k: mean([u["call_to_done_s"] for u in by[k].values()]) for k in DCP_KEYS if k in by}
    dcp_bytes = max([u.get("bytes", 0) for k in DCP_KEYS if k in by for u in by[k].values()], default=0)
    return {"loop": loop, "best_dcp": best, "seal": seal, "raw": raw, "dcp_call_to_done_mean_s": dcp_done,
            "dcp_bytes_per_save": dcp_bytes, "rounds": len(rounds)}


def pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 100:+.1f}%"


def report(s: dict[str, Any], args: argparse.Namespace, state_bytes: int) -> list[str]:
    lines = [f"loop overhead: {state_bytes / MIB:.0f} MiB of fp32 params + AdamW state, checkpoint every {args.every} "
             f"steps, {s['rounds']} interleaved rounds ({s['rounds'] * args.every} steps per configuration)",
             f"  {'configuration':43} {'step ms':>8} {'overhead':>9} {'±95%':>6} {'paired med':>10} "
             f"{'ckpt call ms':>12} {'charged drain ms':>16} {'cpu s/unit (loop+helpers)':>26} {'extra cpu s/ckpt':>16}"]
    for k, p in s["loop"].items():
        lines.append(f"  {CONFIGS[k]:43} {p['mean_step_s'] * 1e3:8.1f} {pct(p['overhead']):>9} "
                     f"{p['overhead_ci95'] * 100:5.1f}% {pct(p['median_paired_overhead']):>10} "
                     f"{p['ckpt_call_mean_s'] * 1e3:12.1f} {p['charged_drain_mean_s'] * 1e3:16.1f} "
                     f"{p['trainer_cpu_per_unit_s']:13.2f}+{p['helper_cpu_per_unit_s']:<12.2f} "
                     f"{p['extra_cpu_per_checkpoint_s']:9.2f} ±{p['extra_cpu_ci95_s']:.2f}")
    best = s["best_dcp"]
    for k in FTD_KEYS:
        if k in s["loop"] and best:
            r = s["loop"][k].get("ratio_to_best_dcp")
            ok = r is not None and r <= LOOP_TARGET
            lines.append(f"  {CONFIGS[k]}: overhead / best async_save's ({CONFIGS[best]}) = "
                         f"{'n/a' if r is None else f'{r:.2f}'} (target <= {LOOP_TARGET}) {'PASS' if ok else 'FAIL'}")
    raw = s["raw"]
    nbytes = max([f["durable_step_bytes"] for f in s["seal"].values()], default=0)
    lines += ["", f"seal -> durable: {nbytes / MIB:.1f} MiB per durable step (dcp writes "
                  f"{s['dcp_bytes_per_save'] / MIB:.1f} MiB per save), same directory",
              f"  raw write+fsync of those bytes: during training {raw['training_mean_s']:.3f} s mean "
              f"(n {len(raw['training_s'])}); idle {raw['idle_write_median_s']:.3f} s median "
              f"({', '.join(f'{t:.3f}' for t in raw['idle_write_s'])}); idle via sendfile from /dev/shm "
              f"{raw['idle_sendfile_median_s']:.3f} s median ({', '.join(f'{t:.3f}' for t in raw['idle_sendfile_s'])})"]
    for k, f in s["seal"].items():
        ok = f["ratio_to_raw_training"] <= SEAL_TARGET
        lines.append(f"  {CONFIGS[k]}: during training {f['seal_to_durable_mean_s']:.3f} s mean over {f['count']:.0f} "
                     f"steps (write+fsync {f['write_mean_s']:.3f} s; markers {f['marker_seal_to_commit_mean_s']:.3f} s) "
                     f"= {f['ratio_to_raw_training']:.2f}x raw (target <= {SEAL_TARGET}) {'PASS' if ok else 'FAIL'}")
        if "idle_seal_to_durable_s" in f:
            ok = f["idle_ratio_to_raw"] <= SEAL_TARGET
            lines.append(f"      idle: {f['idle_seal_to_durable_s']:.3f} s (write+fsync {f['idle_write_s']:.3f} s) "
                         f"= {f['idle_ratio_to_raw']:.2f}x raw write idle (target <= {SEAL_TARGET}) "
                         f"{'PASS' if ok else 'FAIL'}, {f['idle_ratio_to_sendfile']:.2f}x "
                         f"raw sendfile idle; durable steps skipped {f['skipped']:.0f}, failed {f['failed']:.0f}; "
                         f"snapshots sealed {f['snapshots_sealed']}, skipped {f['snapshots_skipped']}, stall mean "
                         f"{f['stall_mean_s'] * 1e3:.1f} ms, max {f['stall_max_s'] * 1e3:.1f} ms")
    for k, v in s["dcp_call_to_done_mean_s"].items():
        lines.append(f"  {CONFIGS[k]}: async_save call -> upload complete {v:.3f} s mean")
    return lines


# ---- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, keys: list[str], base: Path) -> tuple[Trainer, list[dict[str, Any]], dict[str, Any]]:
    tr = Trainer(args)
    units: list[dict[str, Any]] = []
    idle: dict[str, Any] = {}
    with ExitStack() as stack:
        cfgs: dict[str, Config] = {"none": Config("none")}
        for k in keys:
            if k in FTD_KEYS:
                cfgs[k] = Ftd(k, stack, base, tr.model, tr.opt, args.every)
            elif k in DCP_KEYS:
                cfgs[k] = Dcp(k, stack, base, tr.model, tr.opt)
        index, nbytes = 1, 0
        for w in range(args.warmup):  # segments allocated, dcp's process started, caches warm
            for k, cfg in cfgs.items():
                row = tr.unit(cfg, index)
                index += 1
                nbytes = max(nbytes, row.get("durable_step_bytes", 0))
                log(f"warm-up {w + 1}/{args.warmup} {k}: {row['mean_step_s'] * 1e3:.0f} ms/step")
        nbytes = nbytes or tr.params * 12
        if "raw_io" in keys:
            cfgs["raw_io"] = RawIo("raw_io", base, nbytes)
            tr.unit(cfgs["raw_io"], index)
            index += 1
        order = [k for k in keys if k in cfgs]
        rng = random.Random(args.seed)
        t_start = time.monotonic()
        for r in range(args.rounds):
            rng.shuffle(order)
            for k in order:
                row = tr.unit(cfgs[k], index)
                row.update(config=k, round=r, index=index, loadavg_1m=os.getloadavg()[0])
                units.append(row)
                index += 1
            line = ", ".join(f"{u['config']} {u['mean_step_s'] * 1e3:.0f}" for u in units[-len(order):])
            log(f"round {r + 1}/{args.rounds} (ms/step): {line}; load {os.getloadavg()[0]:.1f} "
                f"({time.monotonic() - t_start:.0f} s)")
        for k in FTD_KEYS:
            if k in cfgs:
                idle[k] = cfgs[k].idle()  # type: ignore[attr-defined]
                idle[k]["snapshot_stats"] = cfgs[k].stats()  # type: ignore[attr-defined]
                log(f"idle {k}: seal -> durable {idle[k]['seal_to_durable_s']:.3f} s")
        raw_dir = base / "ckpt" / "raw-idle"
        raw_dir.mkdir()
        view = cfgs["raw_io"].view if "raw_io" in cfgs else memoryview(  # type: ignore[attr-defined]
            torch.empty(nbytes, dtype=torch.uint8).random_().numpy()).cast("B")
        idle["raw_write_s"], idle["raw_sendfile_s"] = [], []
        with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                         prefix="ftd-durable-bench-") as f:
            f.write(view)
            f.flush()
            for _ in range(args.raw_repeats):  # alternated, so a slow spell of the disk hits both
                idle["raw_write_s"].append(raw_write(raw_dir, view))
                idle["raw_sendfile_s"].append(raw_sendfile(raw_dir, Path(f.name), nbytes))
        log(f"idle raw write+fsync of {nbytes / MIB:.1f} MiB: {', '.join(f'{t:.3f}' for t in idle['raw_write_s'])} s; "
            f"sendfile {', '.join(f'{t:.3f}' for t in idle['raw_sendfile_s'])} s")
    return tr, units, idle


def rerender(path: Path) -> int:
    """Summary and report of a results file, recomputed from its units and idle figures."""
    doc = json.loads(path.read_text())
    args = argparse.Namespace(**doc["args"])
    keys = [k for k in CONFIGS if any(u["config"] == k for u in doc["units"])]
    doc["summary"] = summarize(doc["units"], doc["idle"], keys)
    doc["report"] = report(doc["summary"], args, doc["model"]["state_bytes"])
    print("\n".join(doc["report"]))
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="durable_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--state-mb", type=float, default=256, help="MiB of fp32 parameters + AdamW state")
    p.add_argument("--layers", type=int, default=4, help="Linear + GELU layers")
    p.add_argument("--batch", type=int, default=256, help="rows per batch (sets the step time)")
    p.add_argument("--every", type=int, default=5, help="checkpoint cadence in steps (FTD_DURABLE_EVERY)")
    p.add_argument("--rounds", type=int, default=24, help="timed rounds; each runs one unit (N steps) of every "
                                                          "configuration, in a shuffled order")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--raw-repeats", type=int, default=6, help="idle raw write + fsync repetitions at the end")
    p.add_argument("--seed", type=int, default=0, help="seed of the round order")
    p.add_argument("--dir", default=None, help="disk directory every method writes to (default: a new one under "
                                               "/var/tmp); not tmpfs")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default="", help="file name suffix: durable-<date><tag>.json")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon logs, checkpoints)")
    p.add_argument("--from-json", default=None, help="recompute the summary and report of a results file in place "
                                                     "from its units (no run)")
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.from_json))
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in CONFIGS]:
        p.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    if "none" not in keys:
        keys.insert(0, "none")
    if args.every < 1 or args.rounds < 2 or args.warmup < 1:
        p.error("--every must be at least 1, --rounds at least 2 and --warmup at least 1")
    for k in DCP_KEYS:
        if k in keys and (why := availability("dcp_async_process" if k == "dcp_process" else "dcp_async_thread")):
            log(f"{k}: {why}; left out")
            keys.remove(k)

    parent = args.dir or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    base = Path(tempfile.mkdtemp(prefix="ftd-durable-bench-", dir=parent))
    fs = fs_type(base)
    if fs in ("tmpfs", "ramfs"):
        log(f"WARNING: {base} is on {fs}, not a disk: the figures measure memory, not durability")
    t_start = time.monotonic()
    machine = machine_info()
    load0 = os.getloadavg()
    dim = make_model(int(args.state_mb * MIB), args.layers)[0].in_features
    log(f"model: {args.layers} x Linear({dim},{dim}) + GELU, batch {args.batch}, AdamW; directory {base} ({fs}); "
        f"configurations {', '.join(keys)}; load {load0[0]:.1f}")
    try:
        tr, units, idle = run(args, keys, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    state_bytes = tr.params * 12
    s = summarize(units, idle, keys)
    lines = report(s, args, state_bytes)
    print("\n".join(lines), flush=True)
    doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine, "args": vars(args), "directory_fs": fs, "loadavg_at_end": os.getloadavg(),
           "model": {"layers": args.layers, "dim": tr.dim, "batch": args.batch, "params": tr.params,
                     "state_bytes": state_bytes},
           "targets": {"ftd_loop_overhead_over_best_dcp": LOOP_TARGET, "seal_to_durable_over_raw": SEAL_TARGET},
           "summary": s, "idle": idle, "units": units, "report": lines, "total_s": time.monotonic() - t_start}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"durable-{datetime.date.today().isoformat()}{args.tag}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log(f"wrote {path} ({time.monotonic() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
