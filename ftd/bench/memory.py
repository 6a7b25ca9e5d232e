"""The first snapshot of a fresh process against the steady state, and the memory a rank holds while saving.

    python bench/memory_bench.py [--gib 1] [--snapshots 6] [--compute-s 0.4]

Each variant runs a fresh `ftd daemon` and a fresh trainer process (`--child`) holding about
`--gib` GiB of state (fp32 nn.Linear parameters + AdamW, whose state appears at the first step).
The trainer builds its Snapshotter before its first step (as a loop does), restores (nothing),
trains `--warmup` iterations (simulated forward/backward + optimizer.step), then snapshots after
every other iteration. Per snapshot: what `snapshot()` took to return, the stall of the next
`optimizer.step` (its pre-hook waiting for the copy), how much longer that iteration took than
one without a copy in flight, and the time from `snapshot()` to sealed. Cold = the first
snapshot; steady = those after every segment of the rank was used once.

Memory: the daemon's segment bytes for the rank (Status RPC, and the tmpfs blocks of its
directory) over the snapshot's size; the trainer's private memory (smaps_rollup Private_*, psutil
uss) and shared memory (Shared_*: segment pages counted in RSS because they are mapped), sampled
every 50 ms, before the Snapshotter and at the first snapshot, and their peaks while saving.

Variants (same run): `prepared` (the default: size announced at construction, segments prepared
and mapped ahead, keep=2 in two segments), `unannounced` (nothing announced: what a first
snapshot cost before, and what an optimizer of unknown state still gets), `spare` (FTD_SPARE_SEGMENT=1:
the earlier memory policy, keep + 1 = three segments). Writes bench/results/memory-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch

from ftd.bench import common
from ftd.bench.common import GIB, Compute, log

MIB = 1 << 20
VARIANTS: dict[str, dict[str, str]] = {  # extra daemon environment of each variant
    "prepared": {},
    "prepared_early": {},  # the first snapshot after one iteration, before everything is prepared
    "unannounced": {},
    "spare": {"FTD_SPARE_SEGMENT": "1"},
}
EARLY_WARMUP = 1


# ---- the trainer (a fresh process) ---------------------------------------------------------------


def smaps() -> dict[str, int]:
    """This process's memory: anonymous (RssAnon: its own heap, tensors, staging), shmem (RssShmem: segment
    pages counted in RSS because they are mapped), smaps_rollup Private_*/Shared_* (by how many processes map
    a page, so shm pages only the trainer maps count as private), RSS and psutil's USS."""
    status = _kib_fields(Path("/proc/self/status").read_text())
    rollup = _kib_fields(Path("/proc/self/smaps_rollup").read_text())
    info = psutil.Process().memory_full_info()
    return {"anon": status.get("RssAnon", 0), "shmem": status.get("RssShmem", 0),
            "private": rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
            "shared": rollup.get("Shared_Clean", 0) + rollup.get("Shared_Dirty", 0),
            "rss": info.rss, "uss": info.uss}


def _kib_fields(text: str) -> dict[str, int]:
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


class Sampler:
    """smaps() every `interval` s on a thread; `peak(key)` since the last `reset()`."""

    def __init__(self, interval: float = 0.05):
        self.interval, self._peaks = interval, {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-smaps", daemon=True)

    def start(self) -> Sampler:
        self.reset()
        self._thread.start()
        return self

    def reset(self) -> None:
        with self._lock:
            self._peaks = smaps()

    def peaks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._peaks)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = smaps()
            with self._lock:
                self._peaks = {k: max(v, now[k]) for k, v in self._peaks.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> dict[str, Any]:
    import ftd
    from ftd.client import snapshotter as snapshotter_mod

    torch.manual_seed(0)
    model = common.build_model(int(args.gib * GIB), args.layers)
    opt = common.build_optimizer(model, materialize=False)
    compute = Compute(args.compute_s).calibrate()
    for p in model.parameters():
        p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)
    before = smaps()
    if args.variant == "unannounced":  # what every first snapshot was before announcing
        snapshotter_mod.Snapshotter._prepare_ahead = lambda self: None  # type: ignore[method-assign]
    t0 = time.perf_counter()
    snap = ftd.Snapshotter(model, opt, rank=0, world_size=1)
    construct_s = time.perf_counter() - t0
    prepared_at: list[float] = []
    if snap.prepared is not None:
        threading.Thread(target=lambda: (snap.prepared.done.wait(600), prepared_at.append(time.perf_counter())),
                         daemon=True).start()
    assert snap.restore() == 0

    def iteration() -> tuple[float, float]:
        """(seconds of forward/backward + optimizer.step, the stall measured in that step's pre-hook)"""
        stalls = len(snap.stats.stalls_s)
        t = time.perf_counter()
        compute.run(compute.count)
        opt.step()
        took = time.perf_counter() - t
        return took, (snap.stats.stalls_s[-1] if len(snap.stats.stalls_s) > stalls else 0.0)

    plain = [iteration()[0] for _ in range(max(0, args.warmup - 1))]  # the first creates AdamW's state
    sampler = Sampler().start()
    plain.append(iteration()[0])  # sampled: the peak of an iteration without a copy in flight
    peak_plain = sampler.peaks()
    at_first = smaps()
    first_at = time.perf_counter()
    sampler.reset()
    shots = []
    for i in range(args.snapshots):
        step = args.warmup + 2 * i + 1
        t = time.perf_counter()
        snap.snapshot(step)
        returned = time.perf_counter() - t
        job = snap._inflight
        sealed_at: list[float] = []
        if job is not None:
            threading.Thread(target=lambda j=job: (j.finished.wait(600), sealed_at.append(time.perf_counter())),
                             daemon=True).start()
        overlapped, stall = iteration()
        assert snap.wait(600)
        time.sleep(0.05)
        plain.append(iteration()[0])
        shots.append({"step": step, "return_s": returned, "stall_s": stall, "overlapped_iteration_s": overlapped,
                      "to_sealed_s": (sealed_at[0] - t) if sealed_at else None, "outcome": job.outcome if job else None})
    peaks = sampler.peaks()
    sampler.stop()
    status = snap.client.status()
    rank = next((r for r in status.ranks if r.rank == 0), None)
    stats = snap.stats.to_json()
    snap.close()
    baseline = statistics.median(plain[1:])
    for s in shots:
        s["iteration_slower_s"] = s["overlapped_iteration_s"] - baseline
    return {"variant": args.variant, "construct_s": construct_s,
            "prepared_s": (prepared_at[0] - t0) if prepared_at else None,
            "prepared_before_first_snapshot": bool(prepared_at) and prepared_at[0] <= first_at,
            "first_snapshot_after_construction_s": first_at - t0,
            "segments_mapped_ahead": snap.prepared.mapped if snap.prepared is not None else 0,
            "prepare_failure": snap.prepared.failure if snap.prepared is not None else "",
            "warmup_s": first_at - t0 - construct_s, "plain_iteration_s": baseline, "snapshots": shots,
            "state_bytes": stats["last_bytes"], "sealed": stats["sealed"], "skipped": stats["skipped"],
            "daemon_rank_held_bytes": rank.held_bytes if rank else 0, "daemon_held_bytes": status.held_bytes,
            "sealed_steps": list(rank.sealed_steps) if rank else [],
            "memory": {"before_snapshotter": before, "peak_plain_iteration": peak_plain, "at_first_snapshot": at_first,
                       "peak_while_saving": peaks}}


# ---- the parent --------------------------------------------------------------------------------


def run_variant(args: argparse.Namespace, variant: str, ws: common.Workspace) -> dict[str, Any]:
    from ftd.demo.procs import DaemonProcess, ftd_env

    job = f"mem-{variant}-{uuid.uuid4().hex[:6]}"
    shm = ws.shm / variant
    env = ftd_env(ws.tmp, job, FTD_SHM_DIR=str(shm), FTD_KEEP=str(args.keep), FTD_LOG_LEVEL="WARNING",
                  FTD_SOCKET=str(ws.tmp / f"{variant}.sock"), **VARIANTS[variant])
    daemon = DaemonProcess(env, ws.tmp / f"daemon-{variant}.log")
    out = ws.tmp / f"{variant}.json"
    try:
        daemon.start()
        cmd = [sys.executable, "-m", "ftd.bench.memory", "--child", "--variant", variant, "--out", str(out),
               "--gib", str(args.gib), "--layers", str(args.layers), "--snapshots", str(args.snapshots),
               "--warmup", str(EARLY_WARMUP if variant == "prepared_early" else args.warmup),
               "--compute-s", str(args.compute_s)]
        subprocess.run(cmd, env=env, check=True, timeout=900)
        doc = json.loads(out.read_text())
        doc["daemon_shm_blocks_bytes"] = sum(p.stat().st_blocks * 512 for p in shm.rglob("*.seg"))
        doc["daemon_segments"] = len(list(shm.rglob("*.seg")))
    finally:
        common.stop_daemon(daemon)
    return doc


def summarise(doc: dict[str, Any], segments: int) -> dict[str, Any]:
    shots = doc["snapshots"]
    first, steady = shots[0], shots[segments:] or shots[-1:]

    def med(key: str, xs: list[dict[str, Any]]) -> float:
        return statistics.median(s[key] for s in xs if s[key] is not None)

    mem = doc["memory"]
    state = doc["state_bytes"] or 1
    return {
        "first": {k: first[k] for k in ("return_s", "stall_s", "iteration_slower_s", "to_sealed_s")},
        "steady": {k: med(k, steady) for k in ("return_s", "stall_s", "iteration_slower_s", "to_sealed_s")},
        "shm_held_over_state": doc["daemon_rank_held_bytes"] / state,
        "shm_blocks_over_state": doc["daemon_shm_blocks_bytes"] / state,
        "segments": doc["daemon_segments"],
        # growth while saving: the peak over the snapshots against the peak of an iteration without a copy
        **{f"trainer_{key}_growth_while_saving_bytes": mem["peak_while_saving"][key] - mem["peak_plain_iteration"][key]
           for key in ("anon", "shmem", "private", "uss", "rss")},
        "trainer_shmem_mapped_ahead_bytes": mem["at_first_snapshot"]["shmem"] - mem["before_snapshotter"]["shmem"],
        "trainer_shmem_peak_over_state": mem["peak_while_saving"]["shmem"] / state,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--snapshots", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3, help="iterations between the Snapshotter and the first snapshot")
    p.add_argument("--compute-s", type=float, default=0.4)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="prepared", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(child(args)))
        return 0
    ws = common.Workspace.create()
    results: dict[str, Any] = {}
    try:
        for variant in args.variants.split(","):
            log(f"{variant}: a fresh daemon and trainer, {args.gib:g} GiB of state")
            doc = run_variant(args, variant, ws)
            segments = args.keep + 1 if variant == "spare" else max(args.keep, 2)
            doc["summary"] = summarise(doc, segments)
            results[variant] = doc
            s = doc["summary"]
            log(f"  first: return {s['first']['return_s'] * 1e3:.1f} ms, stall {s['first']['stall_s']:.3f} s, "
                f"iteration +{s['first']['iteration_slower_s']:.3f} s, sealed after {s['first']['to_sealed_s']:.3f} s")
            log(f"  steady: return {s['steady']['return_s'] * 1e3:.1f} ms, stall {s['steady']['stall_s']:.3f} s, "
                f"iteration +{s['steady']['iteration_slower_s']:.3f} s, sealed after {s['steady']['to_sealed_s']:.3f} s")
            log(f"  shm {s['shm_held_over_state']:.2f}x state ({s['segments']} segments); trainer while saving: "
                f"anon +{s['trainer_anon_growth_while_saving_bytes'] / MIB:.0f} MiB, shmem "
                f"+{s['trainer_shmem_growth_while_saving_bytes'] / MIB:.0f} MiB (uss "
                f"+{s['trainer_uss_growth_while_saving_bytes'] / MIB:.0f}, rss "
                f"+{s['trainer_rss_growth_while_saving_bytes'] / MIB:.0f}); "
                f"{s['trainer_shmem_mapped_ahead_bytes'] / MIB:.0f} MiB mapped ahead; prepared "
                f"{doc['prepared_s'] if doc['prepared_s'] is None else round(doc['prepared_s'], 2)} s "
                f"after construction (warm-up {doc['warmup_s']:.2f} s)")
    finally:
        ws.remove()
    doc = {"bench": "memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "variant", "out")},
           "machine": common.machine_info(), "variants": results}
    if "prepared" in results and "unannounced" in results:
        a, b = results["prepared"]["summary"], results["unannounced"]["summary"]
        doc["ratios"] = {
            "prepared_first_over_steady_stall": _ratio(a["first"]["stall_s"], a["steady"]["stall_s"]),
            "prepared_first_over_steady_to_sealed": _ratio(a["first"]["to_sealed_s"], a["steady"]["to_sealed_s"]),
            "unannounced_first_over_steady_to_sealed": _ratio(b["first"]["to_sealed_s"], b["steady"]["to_sealed_s"]),
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"memory-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {path}")
    return 0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
