"""Device check of ftd's CUDA snapshot path: bit-exact restore, pinned D2H throughput, stall.

    python bench/gpu_check.py [--gib 1] [--repeats 5] [--batch 8192]

On a machine without CUDA it prints "no CUDA device" and exits 0. On a CUDA machine it:

1. starts a real `ftd daemon` process (segments under a fresh /dev/shm directory);
2. builds a model of a few large nn.Linear layers on cuda whose fp32 params + AdamW state come to
   about `--gib` GiB, and an `ftd.Snapshotter` (side CUDA stream, segments cudaHostRegister'ed);
3. runs training iterations (real forward/backward, optimizer.step, snapshot) and measures the
   Snapshotter's stall and the iteration time with and without snapshots;
4. measures the snapshot's D2H copy throughput against a plain copy into a
   `torch.empty(..., pin_memory=True)` buffer (and into pageable memory, to show whether the
   registration worked);
5. takes a snapshot, mutates the state with one more step at once (the snapshot must not see it),
   restores into a fresh cuda model/optimizer and compares every parameter and optimizer tensor
   with torch.equal against a clone taken at snapshot time.

Prints a table. Exit status: 0 when the snapshot restored bit-exact, 1 when it did not (or no
snapshot could be sealed/restored), 2 on a setup error. Performance targets are reported as
PASS/FAIL in the table but do not change the exit status. The daemon and its files are removed
at the end, also on error or timeout (--max-seconds).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ftd
from ftd.bench.common import gbps, median
from ftd.demo.procs import DaemonProcess, ftd_env

BYTES_PER_PARAM = 12  # fp32 parameter + AdamW exp_avg + exp_avg_sq
TARGET_COPY_VS_PINNED = 0.8
TARGET_OVERHEAD_VS_ITER = 0.05


class CheckTimeout(Exception):
    """The whole check ran past --max-seconds."""


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class WarningCounter(logging.Handler):
    """Keeps ftd's warnings (e.g. a failed cudaHostRegister) so the table can show them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def sync_training_stream(device: torch.device) -> None:
    """Wait for the training (current) stream only: ftd's copy runs on a side stream and must keep overlapping."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def sync_device(device: torch.device) -> None:
    """Wait for every stream of the device (before timing something from an idle device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- state ------------------------------------------------------------------------------------


def build_model(gib: float, layers: int, device: torch.device) -> nn.Sequential:
    params = gib * (1 << 30) / BYTES_PER_PARAM
    dim = int((params / layers) ** 0.5) // 64 * 64
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(dim, dim, device=device))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def fwd_bwd(model: nn.Sequential, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)
    loss = model(x).square().mean()
    loss.backward()


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor, by a stable name."""
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"optim/{idx}/{key}"] = value
    return out


def differing(expected: dict[str, torch.Tensor], model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names whose tensors are not bit-identical to `expected` (missing ones count)."""
    got = state_tensors(model, opt)
    bad = [name for name in expected if name not in got]
    for name, ref in expected.items():
        if name in got:
            other = got[name]
            if other.device != ref.device:
                other = other.to(ref.device)
            if other.dtype != ref.dtype or other.shape != ref.shape or not torch.equal(other, ref):
                bad.append(name)
    return bad + [name for name in got if name not in expected]


# ---- daemon -----------------------------------------------------------------------------------


@contextmanager
def running_daemon(job: str) -> Iterator[dict[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="ftd-gpucheck-"))
    shm = Path(tempfile.mkdtemp(prefix="ftd-gpucheck-", dir="/dev/shm"))
    env = ftd_env(tmp, job, FTD_SHM_DIR=str(shm), FTD_MEMORY_RESERVE="0", FTD_KEEP="2")
    daemon = DaemonProcess(env, tmp / "daemon.log")
    try:
        daemon.start()
        log(f"daemon pid {daemon.proc.pid if daemon.proc else '?'} on unix:{env['FTD_SOCKET']}, segments in {shm}")
        yield env
    except BaseException:
        log_path = tmp / "daemon.log"
        if log_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            print("daemon log (tail):\n  " + "\n  ".join(tail), file=sys.stderr)
        raise
    finally:
        try:
            daemon.stop()
        except (subprocess.TimeoutExpired, OSError):
            daemon.kill(signal.SIGKILL)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- measurements -----------------------------------------------------------------------------


@dataclass
class Measured:
    raw: dict[str, Any] = field(default_factory=dict)


def timed_iterations(model: nn.Sequential, opt: torch.optim.Optimizer, x: torch.Tensor, n: int,
                     snap: Any | None, step: int) -> tuple[list[float], int]:
    """n iterations of forward/backward, step, (snapshot); wall time of each, GPU synchronised."""
    times = []
    for _ in range(n):
        sync_training_stream(x.device)
        t0 = time.perf_counter()
        fwd_bwd(model, x)
        opt.step()
        if snap is not None:
            snap.snapshot(step)
        step += 1
        sync_training_stream(x.device)
        times.append(time.perf_counter() - t0)
    return times, step


def measure_training(model: nn.Sequential, opt: torch.optim.Optimizer, snap: Any, x: torch.Tensor,
                     args: argparse.Namespace, m: Measured, step: int) -> int:
    log(f"warm-up: {args.warmup} iterations with snapshots (segments get allocated and registered)")
    _, step = timed_iterations(model, opt, x, args.warmup, snap, step)
    snap.wait()
    log(f"iterations without snapshots: {args.repeats}")
    plain, step = timed_iterations(model, opt, x, args.repeats, None, step)
    snap.wait()
    n_stalls = len(snap.stats.stalls_s)
    log(f"iterations with a snapshot each: {args.repeats}")
    snapped, step = timed_iterations(model, opt, x, args.repeats, snap, step)
    fwd_bwd(model, x)
    opt.step()  # the stall of a snapshot is measured at the next optimizer.step
    stalls = list(snap.stats.stalls_s)[n_stalls:]
    snap.wait()
    fb = []
    for _ in range(args.repeats):
        sync_device(x.device)
        t0 = time.perf_counter()
        fwd_bwd(model, x)
        sync_device(x.device)
        fb.append(time.perf_counter() - t0)
    m.raw.update(iter_plain_s=plain, iter_snap_s=snapped, stalls_s=stalls, fwd_bwd_s=fb)
    log(f"iteration: {median(plain):.4f} s plain, {median(snapped):.4f} s with snapshots; "
        f"stalls {[round(s, 4) for s in stalls]}")
    return step


def measure_copy(snap: Any, device: torch.device, repeats: int, m: Measured, step: int) -> int:
    """snapshot() and wait until sealed, nothing else running; the Snapshotter's own copy time."""
    log(f"snapshot copy, nothing else running: {repeats} snapshots")
    copies = []
    for _ in range(repeats):
        before = snap.stats.sealed
        sync_device(device)
        snap.snapshot(step)
        snap.wait()
        if snap.stats.sealed != before + 1:
            raise RuntimeError(f"snapshot of step {step} was not sealed: {dict(snap.stats.skip_reasons)}")
        copies.append(snap.stats.last_copy_s)
        step += 1
    m.raw.update(copy_s=copies, snapshot_bytes=snap.stats.last_bytes)
    log(f"copy {[round(c, 4) for c in copies]} s of {snap.stats.last_bytes / 2**30:.3f} GiB")
    return step


def measure_d2h(tensors: list[torch.Tensor], repeats: int, pinned: bool) -> list[float]:
    """Copy the tensors into one host buffer (pinned or pageable), non_blocking, synchronised."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(0)
    views, offset = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        views.append(host[offset:offset + n].view(t.dtype).view(t.shape))
        offset += n
    times = []
    for _ in range(repeats + 1):
        sync_device(tensors[0].device)
        t0 = time.perf_counter()
        for v, t in zip(views, tensors):
            v.copy_(t, non_blocking=pinned)
        sync_device(tensors[0].device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def check_bit_exact(model: nn.Sequential, opt: torch.optim.Optimizer, snap: Any, x: torch.Tensor,
                    args: argparse.Namespace, env: dict[str, str], job: str, m: Measured, step: int) -> None:
    """Snapshot, mutate at once, restore into a fresh model: must equal the state at snapshot time."""
    log("bit-exactness: snapshot, then one more step at once, then restore into a fresh cuda model")
    fwd_bwd(model, x)
    opt.step()
    expected = {k: v.detach().clone() for k, v in state_tensors(model, opt).items()}
    snap.snapshot(step)
    fwd_bwd(model, x)
    opt.step()  # waits for the copy, then mutates the live tensors
    snap.wait()
    changed = sum(not torch.equal(expected[k], v) for k, v in state_tensors(model, opt).items() if k in expected)
    model2 = build_model(args.gib, args.layers, x.device)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-4)
    snap2 = ftd.Snapshotter(model2, opt2, job=job, socket=env["FTD_SOCKET"], rank=0, world_size=1)
    try:
        sync_device(x.device)
        t0 = time.perf_counter()
        restored = snap2.restore()
        sync_device(x.device)
        restore_s = time.perf_counter() - t0
    finally:
        snap2.close()
    bad = differing(expected, model2, opt2) if restored == step else ["(restored step %d, expected %d)" % (restored, step)]
    m.raw.update(restore_s=restore_s, restored_step=restored, expected_step=step, mismatches=bad,
                 tensors_compared=len(expected), tensors_changed_after=changed)
    log(f"restored step {restored} in {restore_s:.3f} s; {len(expected)} tensors compared, "
        f"{len(bad)} differ; {changed} had changed in the live model since the snapshot")


# ---- report -----------------------------------------------------------------------------------


def table(m: dict[str, Any], warnings: list[str], device: str) -> tuple[str, bool]:
    nbytes = m["snapshot_bytes"]
    copy, pinned, pageable = median(m["copy_s"]), median(m["pinned_s"]), median(m["pageable_s"])
    ratio = gbps(nbytes, copy) / gbps(m["d2h_bytes"], pinned)
    it_plain, it_snap = median(m["iter_plain_s"]), median(m["iter_snap_s"])
    overhead = (it_snap - it_plain) / it_plain
    exact = not m["mismatches"]
    rows: list[tuple[str, str, str, str]] = [
        ("device", device, "-", "-"),
        ("state (params + AdamW state)", f"{nbytes / 2**30:.3f} GiB", "-", "-"),
        ("forward/backward (median)", f"{median(m['fwd_bwd_s']) * 1e3:.1f} ms", "-", "-"),
        ("iteration without snapshot (median)", f"{it_plain * 1e3:.1f} ms", "-", "-"),
        ("iteration with snapshot (median)", f"{it_snap * 1e3:.1f} ms", "-", "-"),
        ("snapshot overhead per iteration", f"{overhead * 100:.1f} %", f"<= {TARGET_OVERHEAD_VS_ITER:.0%}",
         "PASS" if overhead <= TARGET_OVERHEAD_VS_ITER else "FAIL"),
        ("Snapshotter stall (CPU wait in optimizer.step, median)",
         f"{median(m['stalls_s']) * 1e3:.1f} ms" if m["stalls_s"] else "none measured", "-", "-"),
        ("snapshot D2H copy into registered shm", f"{copy * 1e3:.1f} ms = {gbps(nbytes, copy):.1f} GB/s", "-", "-"),
        ("plain D2H into torch.empty(pin_memory=True)", f"{pinned * 1e3:.1f} ms = {gbps(m['d2h_bytes'], pinned):.1f} GB/s",
         "-", "-"),
        ("plain D2H into pageable memory", f"{pageable * 1e3:.1f} ms = {gbps(m['d2h_bytes'], pageable):.1f} GB/s",
         "-", "-"),
        ("snapshot copy / pinned copy", f"{ratio:.2f}", f">= {TARGET_COPY_VS_PINNED}",
         "PASS" if ratio >= TARGET_COPY_VS_PINNED else "FAIL"),
        ("ftd warnings (e.g. cudaHostRegister failed)", str(len(warnings)), "0", "PASS" if not warnings else "FAIL"),
        ("restore into fresh cuda model", f"{m['restore_s']:.3f} s", "-", "-"),
        ("restore bit-exact (torch.equal, every tensor)",
         "yes" if exact else f"NO: {m['mismatches'][:4]}", "yes", "PASS" if exact else "FAIL"),
        ("tensors compared / changed after snapshot", f"{m['tensors_compared']} / {m['tensors_changed_after']}",
         "-", "-"),
    ]
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "target", "result")]) for i in range(4)]
    rule = "  ".join("-" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(("metric", "value", "target", "result"), widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(rule)
    for w in warnings[:5]:
        lines.append(f"warning: {w}")
    return "\n".join(lines), exact


# ---- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, device: torch.device | None = None) -> int:
    device = device or torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    log(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    shm_free = shutil.disk_usage("/dev/shm").free
    if shm_free < 4 * args.gib * (1 << 30):
        raise OSError(f"/dev/shm has {shm_free / 2**30:.1f} GiB free; the check needs about {4 * args.gib:.1f} GiB")
    warnings = WarningCounter()
    logging.getLogger("ftd").addHandler(warnings)
    job = f"gpucheck-{uuid.uuid4().hex[:8]}"
    m = Measured()
    with running_daemon(job) as env:
        torch.manual_seed(0)
        model = build_model(args.gib, args.layers, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch, model[0].in_features, device=device)
        fwd_bwd(model, x)
        opt.step()  # materialise the AdamW state
        log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {device}")
        snap = ftd.Snapshotter(model, opt, job=job, socket=env["FTD_SOCKET"], rank=0, world_size=1)
        try:
            step = measure_training(model, opt, snap, x, args, m, 1)
            step = measure_copy(snap, device, args.repeats, m, step)
            tensors = list(state_tensors(model, opt).values())
            log(f"plain D2H baselines: {args.repeats} copies into pinned and into pageable host memory")
            m.raw["pinned_s"] = measure_d2h(tensors, args.repeats, pinned=True)
            m.raw["pageable_s"] = measure_d2h(tensors, max(1, args.repeats // 2), pinned=False)
            m.raw["d2h_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
            check_bit_exact(model, opt, snap, x, args, env, job, m, step)
            m.raw["skipped"] = snap.stats.skipped
        finally:
            snap.close(timeout=30)
    text, exact = table(m.raw, warnings.messages, name)
    print()
    print(text)
    if m.raw.get("skipped"):
        print(f"snapshots skipped: {m.raw['skipped']}")
    return 0 if exact else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="size of params + AdamW state, GiB")
    p.add_argument("--layers", type=int, default=4, help="number of square nn.Linear layers")
    p.add_argument("--batch", type=int, default=8192, help="rows of the random input per forward/backward")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int, default=4, help="iterations first (keep=2 -> 2 segments)")
    p.add_argument("--max-seconds", type=int, default=240, help="give up (cleanly) after this long")
    return p.parse_args(argv)


def _on_alarm(signum: int, frame: Any) -> None:
    raise CheckTimeout("gpu_check ran past --max-seconds")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              "nothing to check here", flush=True)
        return 0
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.max_seconds)
    try:
        return run(args)
    except CheckTimeout as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1
    except (ftd.FtdError, OSError) as exc:
        print(f"gpu_check: setup failed: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a snapshot was not sealed, or CUDA failed
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
