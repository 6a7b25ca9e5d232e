"""The restore benchmark's measurements (bench/restore_bench.py): memcpy reference, ways of mapping a
segment, warm restores into the live model, cold restores in fresh child processes, memory growth.

The child half runs as `python -m ftd.bench.restore SPEC_JSON`: it builds the same model and a fresh
AdamW (no state), restores once (the first restore of that process) and prints one JSON line.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import xxhash
from torch import nn

from ftd.bench.common import build_model, median, state_tensors
from ftd.client import restore as restore_mod
from ftd.client import state
from ftd.client.segments import torch_dtype
from ftd.manifest import Manifest

MADV_POPULATE_READ = 22  # Linux 5.14+
PAGE = mmap.PAGESIZE


# ---- memory: private (anonymous) vs shared (the segment's shm pages) --------------------------


def memory_now() -> dict[str, int]:
    """This process's RssAnon (private), RssShmem (shared segment pages) and VmRSS, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class MemoryPeak:
    """Samples memory_now() every 2 ms while active; `growth()` is the peak minus the start, per field."""

    def __init__(self) -> None:
        self.start = self.peak = self.end = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryPeak:
        self.start = memory_now()
        self.peak = dict(self.start)
        self._thread = threading.Thread(target=self._run, name="bench-mem", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            for k, v in memory_now().items():
                self.peak[k] = max(self.peak[k], v)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end = memory_now()
        for k, v in self.end.items():
            self.peak[k] = max(self.peak[k], v)

    def growth(self) -> dict[str, int]:
        """Peak growth while active and growth left after it, of private (RssAnon) and shared (RssShmem) memory."""
        return {"private_peak": self.peak["RssAnon"] - self.start["RssAnon"],
                "shared_peak": self.peak["RssShmem"] - self.start["RssShmem"],
                "rss_peak": self.peak["VmRSS"] - self.start["VmRSS"],
                "private_after": self.end["RssAnon"] - self.start["RssAnon"],
                "shared_after": self.end["RssShmem"] - self.start["RssShmem"]}


# ---- references ---------------------------------------------------------------------------------


def memcpy_s(tensors: list[torch.Tensor], repeats: int) -> list[float]:
    """Tensor.copy_ of `tensors` into already-touched buffers of the same sizes (the reference)."""
    dst = [torch.empty_like(t) for t in tensors]
    for d in dst:
        d.fill_(0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, t in zip(dst, tensors):
            d.copy_(t)
        times.append(time.perf_counter() - t0)
    return times


def mapping_s(path: str, size: int) -> dict[str, float]:
    """Ways of getting a segment's pages into this process, each on a fresh read-only mapping."""
    fd = os.open(path, os.O_RDONLY)
    out: dict[str, float] = {}
    try:
        def populated(flags: int, advice: int | None) -> float:
            t0 = time.perf_counter()
            m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
            if advice is not None:
                m.madvise(advice)
            dt = time.perf_counter() - t0
            m.close()
            return dt

        out["map_populate_s"] = populated(mmap.MAP_SHARED | mmap.MAP_POPULATE, None)
        try:
            out["map_madv_populate_read_s"] = populated(mmap.MAP_SHARED, MADV_POPULATE_READ)
        except OSError:
            out["map_madv_populate_read_s"] = float("nan")
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        mv = memoryview(m)
        t0 = time.perf_counter()
        m.madvise(mmap.MADV_WILLNEED)
        out["map_madv_willneed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, size, 4 << 20):
            xxhash.xxh3_64_intdigest(mv[i:i + (4 << 20)])
        out["hash_faulting_on_demand_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, size, 4 << 20):
            xxhash.xxh3_64_intdigest(mv[i:i + (4 << 20)])
        out["hash_mapped_s"] = time.perf_counter() - t0
        mv.release()
        m.close()
        buf = memoryview(bytearray(1 << 20))
        t0 = time.perf_counter()
        for i in range(0, size, 1 << 20):
            n = os.preadv(fd, [buf], i)
            xxhash.xxh3_64_intdigest(buf[:n])
        out["pread_hash_1_thread_s"] = time.perf_counter() - t0
    finally:
        os.close(fd)
    out["fault_on_demand_s"] = out["hash_faulting_on_demand_s"] - out["hash_mapped_s"]
    return out


# ---- restores -----------------------------------------------------------------------------------


def ftd_restore(client: Any, job: str, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """One restore (the memory path Snapshotter.restore takes) with its split and memory growth."""
    with MemoryPeak() as mem:
        t0 = time.perf_counter()
        result = restore_mod.restore(client, job, 0, 1, model, opt, None, None)
        total = time.perf_counter() - t0
    if not result.step:
        raise RuntimeError(f"restore found nothing to restore: {result.failures}")
    return {"total_s": total, **{f"{k}_s": v for k, v in result.timings.items()}, "memory": mem.growth()}


def legacy_restore(client: Any, job: str, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The sequence restore ran before (MAP_POPULATE map, Manifest.verify of the mapping, then state.apply
    copying out of it), for a same-run comparison."""
    with MemoryPeak() as mem:
        t0 = time.perf_counter()
        reply = client.open(step)
        manifest = Manifest.from_json(reply.manifest_json)
        t1 = time.perf_counter()
        fd = os.open(reply.path, os.O_RDONLY)
        m = mmap.mmap(fd, manifest.data_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        os.close(fd)
        t2 = time.perf_counter()
        manifest.verify(memoryview(m))
        t3 = time.perf_counter()
        seg = torch.frombuffer(m, dtype=torch.uint8)
        entries = manifest.entry_map()

        def view(name: str) -> torch.Tensor:
            e = entries[name]
            return seg[e.offset:e.offset + e.nbytes].view(torch_dtype(e.dtype)).reshape(e.shape)

        state.apply(manifest, view, model, opt, None, None)
        t4 = time.perf_counter()
        seg = view = None  # the mapping's last views
        try:
            m.close()
        except BufferError:  # a view still alive: the mapping goes with it
            pass
    return {"total_s": t4 - t0, "map_s": t2 - t1, "verify_s": t3 - t2, "apply_s": t4 - t3, "memory": mem.growth()}


def digests(tensors: list[torch.Tensor]) -> list[int]:
    return [xxhash.xxh3_64_intdigest(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            for t in tensors]


def cold_restore(spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run the child half in a fresh process; its JSON line."""
    done = subprocess.run([sys.executable, "-m", "ftd.bench.restore", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"cold restore child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each timing and memory figure over `runs`."""
    keys = [k for k in runs[0] if k.endswith("_s")]
    out: dict[str, Any] = {k: median([r[k] for r in runs if k in r]) for k in keys}
    out["memory"] = {k: median([r["memory"][k] for r in runs]) for k in runs[0]["memory"]}
    return out


# ---- the child ----------------------------------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import ftd

    t_start = time.perf_counter()
    torch.manual_seed(1)
    model = build_model(spec["nbytes"], spec["layers"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    snap = ftd.Snapshotter(model, opt, job=spec["job"], socket=spec["socket"], rank=0, world_size=1)
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t_start}
    try:
        if spec.get("legacy"):
            run = legacy_restore(snap.client, spec["job"], spec["step"], model, opt)
        else:
            run = ftd_restore(snap.client, spec["job"], model, opt)
        out.update(run)
        out["bit_exact"] = digests(state_tensors(model, opt)) == spec["digests"]
        opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor) and t.dim())
        out["optimizer_state_bytes"] = opt_bytes
        if spec.get("measure_alloc"):  # the same bytes allocated and first touched, apart from any restore
            t0 = time.perf_counter()
            fresh = [torch.empty_like(t) for s in opt.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor) and t.dim()]
            for t in fresh:
                t.fill_(0)
            out["optimizer_alloc_touch_s"] = time.perf_counter() - t0
            del fresh
    finally:
        snap.close(timeout=10)
    return out


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
