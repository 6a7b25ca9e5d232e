"""Per-size measurements: every method on the same model + AdamW state (stall, done, restore, RSS, bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ftd.bench.common import (Compute, RssWatch, Workspace, build_model, build_optimizer, fmt_size, log, nbytes_of,
                              running_daemon, state_tensors, summary)
from ftd.bench.methods import METHODS, Ftd, Memcpy, Method, availability, make_method


def measure_nocompute(m: Method, repeats: int, step: int) -> tuple[dict[str, list[float]], int]:
    """save then wait at once: 'stall' = until save() returns (ftd: + optimizer.step()'s wait),
    'done' = until complete."""
    stall, done = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = m.save(step)
        t1 = time.perf_counter()
        m.wait(h)
        done.append(time.perf_counter() - t0)
        step += 1
        if isinstance(m, Ftd):  # the stall is what the next optimizer.step() waits for
            t0 = time.perf_counter()
            m.save(step)
            t1b = time.perf_counter()
            m.opt.step()
            stall.append(t1b - t0 + m.snap.stats.last_stall_s)
            m.wait(step)
            step += 1
        else:
            stall.append(t1 - t0)
    return {"stall_nocompute_s": stall, "done_s": done}, step


def measure_with_compute(m: Method, compute: Compute, repeats: int, step: int) -> tuple[dict[str, list[float]], int]:
    """The loop compute -> optimizer.step() -> save. A save's stall is the time in save() plus what
    it makes the loop wait later: ftd's pre-step wait, or an async peer's wait for the previous
    save before the next one (sync saves: the save itself)."""
    calls, later, computes = [], [], []
    pending = None
    for i in range(repeats + 1):
        computes.append(compute.timed())
        waited = 0.0
        if pending is not None:
            t0 = time.perf_counter()
            m.wait(pending)
            waited = time.perf_counter() - t0
            pending = None
        n_stalls = len(m.snap.stats.stalls_s) if isinstance(m, Ftd) else 0
        m.opt.step()
        if isinstance(m, Ftd) and len(m.snap.stats.stalls_s) > n_stalls:
            waited += m.snap.stats.last_stall_s
        if i > 0:
            later.append(waited)
        if i < repeats:
            t0 = time.perf_counter()
            h = m.save(step)
            calls.append(time.perf_counter() - t0)
            if m.kind == "async":
                pending = h
            elif m.kind != "ftd":  # ftd: the next optimizer.step() waits for the copy, the seal is async
                m.wait(h)
            last = h
            step += 1
    if pending is not None:
        m.wait(pending)
    if isinstance(m, Ftd):
        m.wait(last)
    return {"stall_compute_s": [c + w for c, w in zip(calls, later)], "compute_in_loop_s": computes}, step


def restore_in_child(m: Method, nbytes: int, layers: int, repeats: int, device: str, timeout: float) -> dict[str, Any]:
    spec = dict(m.restore_spec(), nbytes=nbytes, layers=layers, repeats=repeats, device=device,
                threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-m", "ftd.bench.restore_child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"restore child for {m.key} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(lines[-1])


def run_method(key: str, nbytes: int, args: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, compute: Compute,
               ws: Workspace, sub: Path, daemon_ctx: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"label": METHODS[key][0], "kind": METHODS[key][1]}
    env = daemon = None
    if key == "ftd":
        env, daemon = daemon_ctx.__enter__()
    m = None
    try:
        daemon_pid = {daemon.proc.pid} if daemon is not None and daemon.proc is not None else set()
        watch = RssWatch(exclude=daemon_pid, extra=daemon_pid)
        with watch:
            m = make_method(key, model, opt, sub, ws.tmp / fmt_size(nbytes), args.device, env=env)
            t0 = time.perf_counter()
            for w in range(2 if key == "ftd" else 1):  # first saves allocate (ftd: its max(keep, 2) segments), spawn ...
                m.wait(m.save(w))
            res["warmup_s"] = time.perf_counter() - t0
            step = 10
            nc, step = measure_nocompute(m, args.repeats, step)
            wc, step = (measure_with_compute(m, compute, args.repeats, step) if compute is not None
                        else ({"stall_compute_s": [], "compute_in_loop_s": []}, step))
        res.update(nc)
        res.update(wc)
        res["bytes_written"] = m.bytes_written()
        res["peak_rss"] = watch.peak
        res["peak_rss_over_base"] = watch.peak - watch.base
        if daemon_pid:
            res["daemon_peak_rss"] = watch.extra_peak
        if isinstance(m, Memcpy):
            res["restore_s"] = [m.restore_once() for _ in range(args.repeats)]
            res["restore_where"] = "in-process (copy back)"
        elif args.restore == "subprocess":
            child = restore_in_child(m, nbytes, args.layers, args.repeats, args.device, timeout=args.restore_timeout)
            res["restore_s"], res["restore_child"] = child["restore_s"], child
            res["restore_where"] = "fresh process"
        else:
            res["restore_s"] = restore_in_process(m, nbytes, args)
            res["restore_where"] = "in-process, fresh model/optimizer"
        for k in ("stall_compute_s", "stall_nocompute_s", "done_s", "restore_s"):
            res[k.replace("_s", "")] = summary(res[k])
        return res
    finally:
        if m is not None:
            m.close()
        if key == "ftd":
            daemon_ctx.__exit__(None, None, None)


def restore_in_process(m: Method, nbytes: int, args: Any) -> list[float]:
    from ftd.bench import restore_child

    model2 = build_model(nbytes, args.layers, args.device)
    opt2 = build_optimizer(model2, materialize=False)
    spec = dict(m.restore_spec(), device=args.device)
    fn = restore_child.restore_fn(spec, model2, opt2)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    for snap in restore_child.CLOSE:
        snap.close(timeout=10)
    restore_child.CLOSE.clear()
    return times


def run_size(nbytes: int, methods: list[str], args: Any, ws: Workspace) -> dict[str, Any]:
    """Every method at one state size; a method that fails is recorded with its error, the rest go on."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(nbytes, args.layers, args.device)
    opt = build_optimizer(model)
    actual = nbytes_of(state_tensors(model, opt))
    out: dict[str, Any] = {"requested_bytes": nbytes, "state_bytes": actual,
                           "params": sum(p.numel() for p in model.parameters()), "methods": {}}
    log(f"[{fmt_size(nbytes)}] built {actual / 2**20:.0f} MiB of params + AdamW state in {time.perf_counter() - t0:.1f} s")
    compute = Compute(args.compute_s, args.device).calibrate() if args.compute_s > 0 else None
    if compute is not None:
        out["compute_alone_s"], out["compute_matmuls"] = compute.alone_s, compute.count
    sub = ws.shm / fmt_size(nbytes)
    for key in methods:
        reason = availability(key)
        if reason:
            log(f"[{fmt_size(nbytes)}] {key}: {reason}")
            out["methods"][key] = {"label": METHODS[key][0], "kind": METHODS[key][1], "error": reason}
            continue
        log(f"[{fmt_size(nbytes)}] {METHODS[key][0]} ...")
        job = f"cmp-{uuid.uuid4().hex[:8]}"
        try:
            r = run_method(key, nbytes, args, model, opt, compute, ws, sub, running_daemon(ws, job))
        except Exception as exc:  # noqa: BLE001 - record and go on with the next method
            log(f"[{fmt_size(nbytes)}] {key} FAILED: {type(exc).__name__}: {exc}")
            out["methods"][key] = {"label": METHODS[key][0], "kind": METHODS[key][1],
                                   "error": f"{type(exc).__name__}: {exc}"}
            continue
        out["methods"][key] = r
        sc = r["stall_compute"]["median"]
        log(f"[{fmt_size(nbytes)}] {key}: stall {sc * 1e3:.1f} ms (with compute), "
            f"{r['stall_nocompute']['median'] * 1e3:.1f} ms (none); done {r['done']['median'] * 1e3:.1f} ms; "
            f"restore {r['restore']['median'] * 1e3:.1f} ms ({r['restore_where']}); "
            f"peak RSS +{r['peak_rss_over_base'] / 2**20:.0f} MiB; {r['bytes_written'] / 2**20:.0f} MiB written")
    return out
