"""Shared pieces of the comparison benchmark: the training state, the simulated forward/backward,
memory watching, a daemon in a scratch directory, sizes and progress lines."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

BYTES_PER_PARAM = 12  # fp32 parameter + AdamW exp_avg + exp_avg_sq
MATMUL_DIM = 1024
MIB, GIB = 1 << 20, 1 << 30


def log(msg: str) -> None:
    """A progress line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (10^9 bytes per second); infinite for 0 seconds."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def summary(xs: list[float]) -> dict[str, float]:
    """median / min / max of a list of seconds (NaN when empty)."""
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def parse_size(text: str) -> int:
    """'256MiB', '1GiB', '8M', '0.5G' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 256MiB, 1GiB)")
    mult = {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def fmt_size(n: int) -> str:
    return f"{n / GIB:g}GiB" if n >= GIB and n % (GIB // 4) == 0 else f"{n / MIB:g}MiB"


# ---- the training state -----------------------------------------------------------------------


def build_model(nbytes: int, layers: int, device: str = "cpu") -> nn.Sequential:
    """`layers` square nn.Linear layers whose params + AdamW state come to about `nbytes`."""
    dim = max(8, int((nbytes / BYTES_PER_PARAM / layers) ** 0.5))
    return nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)]).to(device)


def build_optimizer(model: nn.Module, materialize: bool = True) -> torch.optim.AdamW:
    """AdamW; with `materialize` its state exists (one step on small random gradients)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if materialize:
        for p in model.parameters():
            p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)
        opt.step()
    return opt


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    for st in opt.state.values():
        tensors.extend(v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return tensors


def nbytes_of(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def path_bytes(path: Path) -> int:
    """Bytes in a file or directory tree (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Compute:
    """The simulated forward/backward: `count` matmuls, calibrated to about `target_s` seconds."""

    target_s: float
    device: str = "cpu"
    count: int = 0
    alone_s: float = 0.0
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def calibrate(self) -> Compute:
        self.a = torch.randn(MATMUL_DIM, MATMUL_DIM, device=self.device)
        self.b = torch.randn(MATMUL_DIM, MATMUL_DIM, device=self.device)
        self.run(3)
        per = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            self.run(5)
            per = min(per, (time.perf_counter() - t0) / 5)
        self.count = max(1, round(self.target_s / per))
        self.alone_s = median([self.timed() for _ in range(3)])
        return self

    def run(self, count: int) -> None:
        c = self.a
        for _ in range(count):
            c = torch.mm(self.a, self.b)
        float(c[0, 0])  # waits for the device too

    def timed(self) -> float:
        t0 = time.perf_counter()
        self.run(self.count)
        return time.perf_counter() - t0


class RssWatch:
    """Samples the RSS of this process plus its children (minus `exclude` pids) and of `extra` pids
    every 10 ms; `peak` / `extra_peak` are the highest sums seen since `start()`."""

    def __init__(self, exclude: set[int] | None = None, extra: set[int] | None = None):
        self.exclude, self.extra = exclude or set(), extra or set()
        self.me = psutil.Process()
        self.peak = self.extra_peak = self.base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> tuple[int, int]:
        total = self.me.memory_info().rss
        for child in self.me.children(recursive=True):
            if child.pid in self.exclude:
                continue
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        extra = 0
        for pid in self.extra:
            try:
                extra += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total, extra

    def _run(self) -> None:
        while not self._stop.is_set():
            own, extra = self._sample()
            self.peak, self.extra_peak = max(self.peak, own), max(self.extra_peak, extra)
            self._stop.wait(0.01)

    def __enter__(self) -> RssWatch:
        self.base, _ = self._sample()
        self.peak, self.extra_peak = self._sample()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ---- a daemon in a scratch directory -----------------------------------------------------------


@dataclass
class Workspace:
    """Scratch directories: `tmp` on disk (socket, logs, disk checkpoints), `shm` under /dev/shm."""

    tmp: Path
    shm: Path
    made: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, disk_dir: str | None = None) -> Workspace:
        tmp = Path(tempfile.mkdtemp(prefix="ftd-compare-", dir=disk_dir))
        shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        shm = Path(tempfile.mkdtemp(prefix="ftd-compare-", dir=shm_root))
        return cls(tmp, shm)

    def remove(self) -> None:
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def running_daemon(ws: Workspace, job: str, **env_extra: str) -> Iterator[tuple[dict[str, str], Any]]:
    """An `ftd daemon` process for `job` with its segments under ws.shm; stopped (then killed) on exit."""
    from ftd.demo.procs import DaemonProcess, ftd_env

    env = ftd_env(ws.tmp, job, FTD_SHM_DIR=str(ws.shm / "segments"), FTD_MEMORY_RESERVE="0", FTD_KEEP="1",
                  FTD_LOG_LEVEL="WARNING", **env_extra)
    daemon = DaemonProcess(env, ws.tmp / f"daemon-{job}.log")
    try:
        daemon.start()
        yield env, daemon
    finally:
        stop_daemon(daemon)


def stop_daemon(daemon: Any) -> None:
    try:
        daemon.stop()
    except Exception:  # noqa: BLE001 - never leave a daemon behind
        daemon.kill(signal.SIGKILL)


def kill_proc(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(30)


@dataclass
class Row:
    """One line of a benchmark's verdict table: a measured value against its target."""

    metric: str
    value: str
    target: str = "-"
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "-" if self.ok is None else ("PASS" if self.ok else "FAIL")


def verdict_table(rows: list[Row]) -> list[dict[str, str]]:
    """The rows as a results file stores them ("table")."""
    return [{"metric": r.metric, "value": r.value, "target": r.target, "result": r.verdict} for r in rows]


def write_results(path: Path, doc: dict[str, Any], rows: list[Row], notes: list[str]) -> Path:
    """Write a bench's results file: `doc` with the time, the verdict table and `notes`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc["when"] = datetime.datetime.now().isoformat(timespec="seconds")
    doc["table"] = verdict_table(rows)
    doc["notes"] = notes
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import ftd

    cpu = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / GIB,
            "available_gib_at_start": psutil.virtual_memory().available / GIB, "loadavg_at_start": os.getloadavg(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "ftd": ftd.__version__,
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
