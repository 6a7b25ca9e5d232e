"""`ftd demo` (single node): train a small GPT through a trainer crash and a daemon crash.

1. a reference run without failures;
2. the same run with the ftd daemon, SIGKILLing the trainer at a random step (it resumes from
   the daemon's shared memory), then SIGKILLing the daemon (it re-adopts its segments) and the
   trainer once more;
3. a table of each failure, where it recovered from, how long it took and how many steps were
   repeated, and whether final parameters and every step's loss equal the reference bit for bit.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ftd.errors import FtdError
from ftd.demo.procs import DaemonProcess, ftd_env, read_losses, start_trainer, wait_for_step

STEP_SLEEP = "0.1"


@dataclass
class Recovery:
    failure: str
    killed_at: int
    restored: int
    seconds: float


def _say(msg: str) -> None:
    print(msg, flush=True)


def _progress(label: str, losses: Path, steps: int, proc: subprocess.Popen[bytes], width: int = 30) -> None:
    """A progress bar on a terminal; a line every 10 steps otherwise."""
    tty, shown = sys.stdout.isatty(), -1
    while True:
        running = proc.poll() is None
        done = len(read_losses(losses))
        if tty:
            print(f"\r  {label:<14} [{'#' * (width * done // steps):<{width}}] {done}/{steps}", end="", flush=True)
        elif done // 10 != shown // 10 or (not running and done != shown):
            print(f"  {label:<14} {done}/{steps} steps", flush=True)
        shown = done
        if not running:
            break
        time.sleep(0.2)
    if tty:
        print(flush=True)
    if proc.returncode != 0:
        raise FtdError(f"{label} run exited with {proc.returncode}")


def _resumed_step(log: Path, after: int) -> int:
    found = re.findall(r"resumed at step (\d+)", log.read_text()[after:])
    return int(found[0]) if found else 0


def _recover(failure: str, killed_at: int, env: dict[str, str], args: list[str],
             losses: Path, log: Path) -> tuple[Recovery, subprocess.Popen[bytes]]:
    mark = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    proc = start_trainer(args, env, log)
    seen = len(read_losses(losses))
    deadline = time.monotonic() + 120
    while len(read_losses(losses)) == seen and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return Recovery(failure, killed_at, _resumed_step(log, mark), time.monotonic() - t0), proc


def run_demo(steps: int = 60, workdir: str | None = None, seed: int | None = None) -> int:
    """Run the demo; return 0 when everything ended bit for bit equal to the reference."""
    rng = random.Random(seed)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ftd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    env = ftd_env(work, "demo")
    common = ["--steps", str(steps), "--step-sleep", STEP_SLEEP]
    ref_losses, losses, log = work / "reference.jsonl", work / "losses.jsonl", work / "train.log"
    _say(f"ftd demo: {steps} steps of a small GPT (AdamW, warm-up/cosine, dropout); files in {work}")

    _say("[1/3] reference run, no failures")
    proc = start_trainer([*common, "--no-ftd", "--losses", str(ref_losses), "--out", str(work / "reference.pt")],
                         env, work / "reference.log")
    _progress("reference", ref_losses, steps, proc)

    _say("[2/3] run with ftd, failures injected")
    daemon = DaemonProcess(env, work / "daemon.log").start()
    args = [*common, "--losses", str(losses), "--out", str(work / "resumed.pt")]
    kill1 = rng.randrange(3, steps // 3)
    kill2 = rng.randrange(steps // 3 + 2, steps // 2)
    recoveries = []
    proc = start_trainer(args, env, log)
    wait_for_step(losses, kill1, proc, 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _say(f"  SIGKILL trainer at step {kill1}")
    rec, proc = _recover("trainer crash (SIGKILL)", kill1, env, args, losses, log)
    recoveries.append(rec)
    _say(f"  trainer resumed at step {rec.restored} in {rec.seconds:.1f} s")
    wait_for_step(losses, kill2, proc, 300)
    daemon.kill()
    _say(f"  SIGKILL daemon at step {kill2}; restarting it")
    t0 = time.monotonic()
    daemon = DaemonProcess(env, work / "daemon.log").start()
    adopted = re.findall(r"re-adopted (\d+) sealed", (work / "daemon.log").read_text())
    _say(f"  daemon back in {time.monotonic() - t0:.1f} s, re-adopted {adopted[-1] if adopted else '?'} "
         "sealed segment(s)")
    kill3 = min(steps - 3, max(read_losses(losses)) + rng.randrange(3, 8))
    wait_for_step(losses, kill3, proc, 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _say(f"  SIGKILL trainer at step {kill3} (restores from the re-adopted segments)")
    rec, proc = _recover("daemon crash, then trainer crash", kill3, env, args, losses, log)
    recoveries.append(rec)
    _progress("resumed run", losses, steps, proc)
    daemon.stop()

    _say("[3/3] compare with the reference")
    ref, got = read_losses(ref_losses), read_losses(losses)
    same_losses = ref == got and len(ref) == steps
    ref_params = torch.load(work / "reference.pt", weights_only=True)
    got_params = torch.load(work / "resumed.pt", weights_only=True)
    same_params = ref_params.keys() == got_params.keys() and all(
        torch.equal(ref_params[k], got_params[k]) for k in ref_params)
    rows = [("failure", "source", "recover s", "steps repeated", "bit-exact")]
    for r in recoveries:
        rows.append((r.failure, "local shm", f"{r.seconds:.1f}", str(r.killed_at + 1 - r.restored),
                     "yes" if same_params and same_losses else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _say("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    _say(f"  final parameters equal: {same_params}; per-step losses equal: {same_losses} ({len(got)}/{steps} steps)")
    if not workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same_params and same_losses else 1
