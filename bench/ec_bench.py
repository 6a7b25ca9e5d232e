"""Erasure-coding benchmark: codec speed, seal -> protected, rebuild of a lost node, memory held.

    python bench/ec_bench.py [--nodes 4] [--ec 3+1] [--gib 1] [--codec auto] [--repeats 3]

One run, on one machine, measures:

1. codec throughput: encode (k data -> m parity) and rebuild of one lost data chunk from k
   survivors, each codec through ftd.codec.encode_striped / decode_striped on `--codec-mib` MiB
   chunks, in 256 KiB stripes (the codec helpers' default) and 1 MiB stripes (what the daemon's
   Protector uses), against memcpy of the same k chunks (bench/codec_bench.py's helpers), on one
   pinned core;
2. seal -> protected: a loopback cluster of `--nodes` real `ftd daemon` processes
   (ftd.demo.cluster.make_nodes: own shm directory, socket and peer ports per node, CURVE
   bulk transport, EC `--ec`), one snapshot process per node holding an nn.Module of `--gib` GiB
   of fp32 parameters (torch.randn, a fixed seed per node). Each process takes snapshot(1),
   waits until it is sealed and prints the time; this process polls every daemon's Status until
   all report protected_step >= 1. Reported: protected - last seal, and each rotation's encode
   time from the daemons' metrics (see "Figures from metrics" below);
3. rebuild: node 1 loses everything (daemon SIGKILLed, shm wiped); a replacement daemon with
   the same identity starts and List (held while it rebuilds) is timed; the replacement's
   metrics (ftd_rebuild_seconds, ftd_ec_decode_bytes_total) give its own rebuild time. The
   rebuilt segment must be byte-identical to the original (xxh3-128 of the original taken
   before the loss);
4. memory held per node after protection: segment files and parity files under the node's shm
   directory, each as a multiple of the node's snapshot bytes.

Figures from metrics, never from the daemons' logs (each node of make_nodes serves metrics on
127.0.0.1; every daemon's figures are scraped before the snapshots and after protection, and
per-step figures are the DELTAS of a histogram's _sum and _count between those scrapes; each
node encodes one rotation per step, so a delta is that rotation's figure):
- encodes[]: seconds = delta ftd_ec_encode_seconds_sum / _count of the node that encoded the
  rotation; chunk_bytes = delta ftd_ec_encode_bytes_total / k / count; rotation = the node's
  position in its group (the encoder's rule). t_end is no longer the log line's time: it is
  the time of the 0.1 s metrics poll that first saw the node's _count rise (up to ~0.1 s
  late), and t_start = t_end - seconds; first_encode_start_after_last_seal_s and
  last_encode_end_after_last_seal_s inherit that resolution.
- segment_allocations[]: one entry per node (was one per "allocated segment" line):
  seconds = ftd_prefault_seconds_sum / _count since the daemon started (the mean per
  allocation), count = _count, bytes = ftd_shm_held_bytes after protection (the allocated
  segment's size when the node holds one segment, the default here).
- seal_to_protected_s (new): per node, delta ftd_seal_to_protected_seconds_sum, from the
  daemon's local seal to its protected step advancing. sealed_log is now the snapshot
  process's seal time (was the daemon's "sealed rank" line; the same clock, a few ms later),
  protected_log = sealed_log + seal_to_protected_s (was the "is protected" line).
- rebuild: rebuild_s = the replacement's ftd_rebuild_seconds_sum (its counters start at zero,
  so this is its one rebuild, checked against ftd_rebuilds_total{outcome="rebuilt"} and
  ftd_rebuilt_step), decoded_bytes = ftd_ec_decode_bytes_total, log_gbps (name kept) =
  decoded_bytes / rebuild_s, exactly the figures the log line printed. wait_before_rebuild_s
  is now daemon start -> List minus rebuild_s (was start -> the "rebuilding node" line, which
  came after the records were fetched, so record fetches counted in both; now only in rebuild_s).
  rebuild_plan: peers = the replacement's sum of ftd_peer_up, chunk_bytes = the encodes'
  chunk_bytes, rotations = decoded_bytes / chunk_bytes. rebuilt_line_t is now the time of the
  scrape that showed the rebuild.
- daemon_problems: per node, the error counters that are non-zero (ftd_thread_errors_total,
  ftd_checksum_failures_total, ftd_peer_refused_total, ftd_snapshots_aborted_total,
  ftd_refused_snapshots_total, ftd_shm_entries_skipped_total, ftd_segments_dropped_total,
  ftd_rebuilds_total{outcome=failed|unrecoverable}), scraped at the end (was: WARNING/ERROR
  log lines; a warning that no counter records no longer shows; `--keep-logs` keeps the logs for
  people to read). A replacement daemon's counters describe only itself. shutdown[] no
  longer has "problems" (the log lines after SIGTERM); its returncode says whether it was clean.

Daemons run with FTD_KEEP=1 and FTD_PREALLOCATE=0 (one segment per node instead of the default
max(keep, 2) = 2 pre-faulted ones) to keep the run's memory down; `--keep` and `--preallocate` change that.
The run checks free RAM and /dev/shm first and shrinks `--gib` (saying so) when they are short.
Prints progress, then tables; writes bench/results/ec-<date>.json. Daemons, snapshot
processes, shm directories and temporary files are removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
for _p in (str(REPO), str(BENCH_DIR)):  # ftd from this checkout, and codec_bench
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import xxhash  # noqa: E402

import codec_bench  # noqa: E402  (memcpy baseline and timing helpers)
from ftd.client.rpc import DaemonClient  # noqa: E402
from ftd.codec import available_codecs, decode_striped, encode_striped, make_codec  # noqa: E402
from ftd.daemon.groups import ECShape  # noqa: E402
from ftd import knobs  # noqa: E402
from ftd.errors import FtdError  # noqa: E402
from ftd.bench.common import Row, verdict_table, machine_info as common_machine_info  # noqa: E402
from ftd.daemon.groups import plan_groups  # noqa: E402
from ftd.demo.cluster import LocalNode as Node, Metrics, make_nodes  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
LOST_NODE = 1
STEP = 1

# targets (from the issue)
TARGET_REBUILD_GBPS = 0.5
RAM_CAP_GIB = 18.0            # what the whole run may use
PROCESS_OVERHEAD_GIB = 0.35   # per daemon / snapshot process (python + torch or grpc/zmq)

# The snapshot process run on each node (its env is the node's: FTD_JOB, FTD_SOCKET, ...).
CHILD = r"""
import json, sys, time
import torch
from torch import nn
import ftd

gib, seed, step = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t0 = time.time()
torch.manual_seed(seed)
numel = int(gib * (1 << 30)) // 4
parts = 4
sizes = [numel // parts] * (parts - 1) + [numel - (numel // parts) * (parts - 1)]
model = nn.Module()
model.w = nn.ParameterList([nn.Parameter(torch.randn(n)) for n in sizes])
t_built = time.time()
snap = ftd.Snapshotter(model, rank=0, world_size=1)  # job and socket from FTD_JOB / FTD_SOCKET
snap.snapshot(step)  # no optimizer: copies at once
snap.wait()
t_sealed = time.time()
stats = snap.stats
snap.close()
print(json.dumps({"t_start": t0, "t_built": t_built, "t_sealed": t_sealed, "sealed": stats.sealed,
                  "skipped": stats.skipped, "skip_reasons": dict(stats.skip_reasons), "bytes": stats.last_bytes,
                  "copy_s": stats.last_copy_s, "param_bytes": numel * 4}), flush=True)
sys.exit(0 if stats.sealed == 1 else 3)
"""

# error counters a healthy run leaves at zero (ftd/metrics.py); ftd_rebuilds_total by outcome below
ERROR_COUNTERS = ("ftd_thread_errors_total", "ftd_checksum_failures_total", "ftd_peer_refused_total",
                  "ftd_snapshots_aborted_total", "ftd_refused_snapshots_total", "ftd_shm_entries_skipped_total",
                  "ftd_segments_dropped_total")
BAD_REBUILD_OUTCOMES = ("failed", "unrecoverable")


def log(msg: str) -> None:
    """A progress line."""
    print(f"[ec-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- resources ---------------------------------------------------------------------------------


def estimate_ram_gib(nodes: int, gib: float, k: int, m: int, keep_segments: int) -> float:
    """Peak RAM of the cluster phase: each snapshot process's model while its segment(s) fill,
    the parity, the replacement's rebuild buffer (one blob) and its new segment, process overhead."""
    per_node = gib * (1 + keep_segments + m / k)
    rebuild = gib * (1 + m / k)
    return nodes * per_node + rebuild + 2 * nodes * PROCESS_OVERHEAD_GIB


def estimate_shm_gib(nodes: int, gib: float, k: int, m: int, keep_segments: int) -> float:
    return nodes * gib * (keep_segments + m / k) * 1.05 + gib


def codec_ram_gib(k: int, m: int, chunk_mib: int) -> float:
    """memcpy baseline (arrays + concatenation + destination) and the bytes copies, outputs."""
    return (4 * k + 2 * m) * chunk_mib / 1024 + 0.3


def plan_resources(args: argparse.Namespace, k: int, m: int, notes: list[str]) -> float:
    """The GiB per node this run can afford (maybe less than --gib); adds why to `notes`."""
    vm = psutil.virtual_memory()
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None
    avail_gib = vm.available / GIB
    cap = min(RAM_CAP_GIB, avail_gib - 1.5)
    shm_free = shm.free / GIB if shm else float("inf")
    segs = 1 if not args.preallocate else max(args.keep, 2)
    log(f"RAM: {vm.total / GIB:.1f} GiB total, {avail_gib:.1f} GiB available (cap for this run {cap:.1f} GiB); "
        f"/dev/shm free {shm_free:.1f} GiB")
    gib = args.gib
    while gib > 1 / 64 and (estimate_ram_gib(args.nodes, gib, k, m, segs) > cap
                            or estimate_shm_gib(args.nodes, gib, k, m, segs) > shm_free):
        gib /= 2
    if gib <= 1 / 64:
        raise SystemExit(f"not enough memory for even {gib:.3f} GiB per node "
                         f"({avail_gib:.1f} GiB RAM available, {shm_free:.1f} GiB free in /dev/shm)")
    if gib < args.gib:
        msg = (f"reduced --gib from {args.gib} to {gib} GiB per node: the run would need about "
               f"{estimate_ram_gib(args.nodes, args.gib, k, m, segs):.1f} GiB RAM and "
               f"{estimate_shm_gib(args.nodes, args.gib, k, m, segs):.1f} GiB of /dev/shm, with {cap:.1f} GiB RAM "
               f"usable and {shm_free:.1f} GiB free in /dev/shm")
        log("NOTE: " + msg)
        notes.append(msg)
    log(f"estimated peak: {estimate_ram_gib(args.nodes, gib, k, m, segs):.1f} GiB RAM (cluster), "
        f"{codec_ram_gib(k, m, args.codec_mib):.1f} GiB RAM (codec part), "
        f"{estimate_shm_gib(args.nodes, gib, k, m, segs):.1f} GiB of /dev/shm")
    if codec_ram_gib(k, m, args.codec_mib) > cap:
        args.codec_mib = max(16, int(cap / codec_ram_gib(k, m, 1024) * 1024) // 16 * 16)
        notes.append(f"codec chunks reduced to {args.codec_mib} MiB for memory")
    return gib


class MemoryWatch:
    """Samples host memory in use and /dev/shm use every 0.2 s; keeps the peaks."""

    def __init__(self) -> None:
        vm = psutil.virtual_memory()
        self.base_used = vm.total - vm.available
        self.peak_used = self.base_used
        self.min_available = vm.available
        self.peak_shm = self._shm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memwatch", daemon=True)

    @staticmethod
    def _shm() -> int:
        try:
            return shutil.disk_usage("/dev/shm").used
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            vm = psutil.virtual_memory()
            self.peak_used = max(self.peak_used, vm.total - vm.available)
            self.min_available = min(self.min_available, vm.available)
            self.peak_shm = max(self.peak_shm, self._shm())

    def start(self) -> MemoryWatch:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(2)
        return {"baseline_used_gib": self.base_used / GIB, "peak_used_gib": self.peak_used / GIB,
                "peak_added_gib": (self.peak_used - self.base_used) / GIB,
                "min_available_gib": self.min_available / GIB, "peak_shm_used_gib": self.peak_shm / GIB}


# ---- 1. codecs ---------------------------------------------------------------------------------


def _codec_rows(codec: Any, label: str, data: list[bytes], stripe: int, repeats: int) -> list[dict[str, Any]]:
    """Encode, then rebuild data chunk 0 from the k lowest survivors; checked against the original."""
    k, m, length = codec.k, codec.m, len(data[0])
    outs = codec_bench._touched(m, length)
    times, parity = codec_bench._timed(lambda: encode_striped(codec, data, stripe_bytes=stripe, out=outs), repeats)
    rows = [codec_bench._row(label, "encode", k * length, times)]
    present: dict[int, Any] = {i: data[i] for i in range(1, k)}
    present.update({k + j: bytes(parity[j]) for j in range(m)})
    present = dict(sorted(present.items())[:k])
    target = codec_bench._touched(1, length)[0]
    times, rebuilt = codec_bench._timed(
        lambda: decode_striped(codec, present, [0], stripe_bytes=stripe, out={0: target}), repeats)
    if bytes(rebuilt[0]) != data[0]:
        raise SystemExit(f"{label}: rebuilt chunk 0 differs from the original")
    rows.append(codec_bench._row(label, f"rebuild 1 of {k}", k * length, times))
    return rows


def measure_codecs(k: int, m: int, chunk_mib: int, repeats: int, cpu: int) -> dict[str, Any]:
    """One core (pinned, restored afterwards so the daemons are not): memcpy, then every codec."""
    old = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if old is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        length = chunk_mib * MIB
        log(f"codecs: {k}+{m}, {chunk_mib} MiB per chunk ({k * chunk_mib} MiB of data), one core (cpu {cpu}), "
            f"best/median of {repeats} after a warm-up")
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
        memcpy = codec_bench.bench_memcpy(arrays, repeats)
        log(f"  memcpy: {memcpy['median_gbps']:.2f} GB/s")
        data = [a.tobytes() for a in arrays]
        del arrays
        memcpy["memcpy_ref_gbps"] = memcpy["median_gbps"]
        rows = [memcpy]
        small_ref: dict[int, float] = {}
        for name in available_codecs():
            codec = make_codec(name, k, m)
            # reedsolo is pure Python + numpy (~1 GB/s at best): smaller chunks keep the run short
            n = length if name == "isal" else min(length, 16 * MIB)
            chunks = data if n == length else [d[:n] for d in data]
            ref = memcpy["median_gbps"]
            if n != length:  # smaller chunks may sit in cache: compare with a memcpy of the same size
                if n not in small_ref:
                    row = codec_bench.bench_memcpy([np.frombuffer(c, dtype=np.uint8) for c in chunks], repeats)
                    row["codec"] = f"memcpy, {n // MIB} MiB chunks"
                    row["memcpy_ref_gbps"] = small_ref[n] = row["median_gbps"]
                    rows.append(row)
                    log(f"  {row['codec']}: {row['median_gbps']:.2f} GB/s")
                ref = small_ref[n]
            for stripe in sorted({256 << 10, knobs.get().stripe_bytes}):
                label = f"{name}, {stripe / MIB:g} MiB stripes" + (f", {n // MIB} MiB chunks" if n != length else "")
                if stripe == knobs.get().stripe_bytes:
                    label += " (daemon's stripe)"
                got = _codec_rows(codec, label, chunks, stripe, repeats if name == "isal" else max(1, repeats // 2))
                for r in got:
                    r["memcpy_ref_gbps"] = ref
                rows += got
                log("  " + "; ".join(f"{r['codec']} {r['op']}: {r['median_gbps']:.2f} GB/s" for r in got))
        del data
        return {"k": k, "m": m, "chunk_mib": chunk_mib, "pinned_cpu": cpu, "memcpy_gbps": memcpy["median_gbps"],
                "rows": rows}
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)


# ---- daemon metrics ----------------------------------------------------------------------------


def scrape(node: Node) -> Metrics | None:
    """One scrape of the node's metrics endpoint; None when the daemon does not answer."""
    try:
        return node.metrics()
    except OSError:  # URLError, connection refused, timeout
        return None


def hist(m: Metrics, name: str) -> tuple[float, float]:
    """(_sum, _count) of a histogram."""
    return m.value(f"{name}_sum"), m.value(f"{name}_count")


def problems(m: Metrics | None) -> list[str]:
    """The non-zero error counters of one scrape, as text for people."""
    if m is None:
        return ["metrics endpoint did not answer"]
    out = []
    for name, labels, v in m.samples:
        bad = name in ERROR_COUNTERS or (name == "ftd_rebuilds_total" and labels.get("outcome") in BAD_REBUILD_OUTCOMES)
        if bad and v > 0:
            lab = ",".join(f'{k}="{w}"' for k, w in sorted(labels.items()))
            out.append(f"{name}{{{lab}}} = {v:g}")
    return out


# ---- the cluster -------------------------------------------------------------------------------


def node_files(node: Node) -> dict[str, Any]:
    """Sizes of the node's segment and parity files (apparent and allocated)."""
    segs = [p for p in node.shm.glob("ftd-*/rank-*/*.seg")]
    pars = [p for p in node.shm.glob("ftd-*/parity/*.par")]

    def sizes(paths: list[Path]) -> tuple[int, int]:
        apparent = allocated = 0
        for p in paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
        return apparent, allocated

    seg_app, seg_alloc = sizes(segs)
    par_app, par_alloc = sizes(pars)
    return {"segments": len(segs), "segment_bytes": seg_app, "segment_allocated": seg_alloc, "parity_files": len(pars),
            "parity_bytes": par_app, "parity_allocated": par_alloc}


def find_segment(node: Node, step: int) -> tuple[Path, dict[str, Any]]:
    for manifest in node.shm.glob("ftd-*/rank-0/*.manifest.json"):
        doc = json.loads(manifest.read_bytes())
        if doc.get("step") == step:
            return Path(str(manifest).removesuffix(".manifest.json") + ".seg"), doc
    raise FtdError(f"node {node.index} holds no sealed step {step} of rank 0")


def hash_segment(path: Path, data_bytes: int) -> dict[str, Any]:
    """xxh3-128 of the segment's data bytes and of the whole file (data + zero padding)."""
    h_data, h_file = xxhash.xxh3_128(), xxhash.xxh3_128()
    done = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(64 * MIB)
            if not buf:
                break
            if done < data_bytes:
                h_data.update(buf[:data_bytes - done])
            h_file.update(buf)
            done += len(buf)
    return {"data_bytes": data_bytes, "file_bytes": done, "data_xxh3_128": h_data.hexdigest(),
            "file_xxh3_128": h_file.hexdigest()}


def client_for(node: Node, timeout: float = 5.0) -> DaemonClient:
    return DaemonClient(node.env["FTD_SOCKET"], node.env["FTD_JOB"], 0, timeout=timeout)


def protected_steps(clients: list[DaemonClient]) -> list[int]:
    out = []
    for c in clients:
        try:
            out.append(c.status().protected_step)
        except FtdError:
            out.append(-2)
    return out


def spawn_snapshots(nodes: list[Node], gib: float, rpc_timeout: float) -> list[subprocess.Popen[bytes]]:
    procs = []
    for node in nodes:
        env = dict(node.env, FTD_RPC_TIMEOUT=repr(rpc_timeout))
        err = open(node.root / "snapshot.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, repr(gib), str(1000 + node.index), str(STEP)],
                                      env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True))
        err.close()
    return procs


def measure_protection(nodes: list[Node], gib: float, timeout: float, rpc_timeout: float,
                       shape: ECShape) -> dict[str, Any]:
    """Snapshot every node at once; poll Status until every node reports protected_step >= STEP.

    Every 0.1 s the metrics of each node that has not encoded yet are scraped too: the poll at
    which its ftd_ec_encode_seconds_count rises is the encode's end (to the poll's resolution)."""
    groups = plan_groups(len(nodes), shape)
    rotation_of = {n: g.position(n) for g in groups for n in g.members}
    k_of = {n: g.k for g in groups for n in g.members}
    base: dict[int, Metrics] = {}
    for node in nodes:
        m = scrape(node)
        if m is None:
            raise RuntimeError(f"node {node.index}: metrics endpoint (port {node.env.get('FTD_METRICS_PORT')}) "
                               f"does not answer")
        base[node.index] = m
    encode_end: dict[int, float] = {}
    last_scrape = 0.0
    log(f"spawning {len(nodes)} snapshot processes ({gib:g} GiB of parameters each, snapshot({STEP}))")
    clients = [client_for(n) for n in nodes]
    procs = spawn_snapshots(nodes, gib, rpc_timeout)
    children: dict[int, dict[str, Any]] = {}
    first_protected: dict[int, float] = {}
    t_spawn = time.time()
    deadline = time.monotonic() + timeout
    last_report = 0.0
    try:
        while True:
            now = time.time()
            for node, proc in zip(nodes, procs):
                if node.index not in children and proc.poll() is not None:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    try:
                        doc = json.loads(out.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        tail = (node.root / "snapshot.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"snapshot process of node {node.index} exited {proc.returncode} "
                                           f"without a result:\n{tail}") from None
                    if proc.returncode != 0:
                        tail = (node.root / "snapshot.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"node {node.index}: snapshot not sealed: {doc}\n{tail}")
                    children[node.index] = doc
                    log(f"  node {node.index}: python + torch + ftd imported after {doc['t_start'] - t_spawn:.1f} s, "
                        f"built {doc['param_bytes'] / GIB:.2f} GiB in "
                        f"{doc['t_built'] - doc['t_start']:.1f} s, copied in {doc['copy_s']:.2f} s, sealed at "
                        f"+{doc['t_sealed'] - t_spawn:.2f} s ({doc['bytes']} bytes)")
            steps = protected_steps(clients)
            now = time.time()
            if now - last_scrape >= 0.1:
                last_scrape = now
                for node in nodes:
                    if node.index not in encode_end and (m := scrape(node)) is not None and \
                            m.value("ftd_ec_encode_seconds_count") > base[node.index].value("ftd_ec_encode_seconds_count"):
                        encode_end[node.index] = time.time()
            for node, s in zip(nodes, steps):
                if s >= STEP and node.index not in first_protected:
                    first_protected[node.index] = now
                    log(f"  node {node.index} reports step {s} protected at +{now - t_spawn:.2f} s")
            if len(children) == len(nodes) and len(first_protected) == len(nodes):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not protected within {timeout} s: protected steps {steps}, "
                                   f"sealed nodes {sorted(children)}")
            if now - last_report > 5:
                log(f"  waiting: sealed on {len(children)}/{len(nodes)} nodes, protected steps {steps}")
                last_report = now
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            if proc.stdout:
                proc.stdout.close()
        for c in clients:
            c.close()
    max_seal = max(d["t_sealed"] for d in children.values())
    min_seal = min(d["t_sealed"] for d in children.values())
    all_protected = max(first_protected.values())
    # the daemons' own view, from their metrics: deltas since the scrape before the snapshots
    encodes, protected_log, sealed_log, allocs, to_protected = [], {}, {}, [], {}
    for node in nodes:
        m = scrape(node)
        if m is None:
            raise RuntimeError(f"node {node.index}: metrics endpoint does not answer after protection")
        b, i = base[node.index], node.index
        (s1, c1), (s0, c0) = hist(m, "ftd_ec_encode_seconds"), hist(b, "ftd_ec_encode_seconds")
        if c1 > c0:
            secs = (s1 - s0) / (c1 - c0)
            nbytes = m.value("ftd_ec_encode_bytes_total") - b.value("ftd_ec_encode_bytes_total")
            t_end = encode_end.get(i, time.time())
            encodes.append({"node": i, "rotation": rotation_of[i], "k": k_of[i],
                            "chunk_bytes": int(round(nbytes / k_of[i] / (c1 - c0))), "seconds": secs,
                            "count": int(c1 - c0), "t_end": t_end, "t_start": t_end - secs})
        (s1, c1), (s0, c0) = hist(m, "ftd_seal_to_protected_seconds"), hist(b, "ftd_seal_to_protected_seconds")
        if i in children:
            sealed_log[i] = children[i]["t_sealed"]
        if c1 > c0:
            to_protected[i] = s1 - s0
            if i in sealed_log:
                protected_log[i] = sealed_log[i] + to_protected[i]
        ps, pc = hist(m, "ftd_prefault_seconds")  # since the daemon started (FTD_PREALLOCATE=1: at start)
        if pc > 0:
            allocs.append({"node": i, "bytes": int(m.value("ftd_shm_held_bytes")), "seconds": ps / pc,
                           "count": int(pc)})
    encodes.sort(key=lambda e: e["rotation"])
    for e in encodes:
        log(f"  rotation {e['rotation']} (encoded by node {e['node']}; ftd_ec_encode_seconds delta): {e['k']} x "
            f"{e['chunk_bytes']} bytes in {e['seconds']:.2f} s, seen done +{e['t_end'] - max_seal:.2f} s after the "
            f"last seal (0.1 s polls)")
    if to_protected:
        log("  seal -> protected by the daemons (ftd_seal_to_protected_seconds delta): "
            + ", ".join(f"node {i} {v:.2f} s" for i, v in sorted(to_protected.items())))
    return {
        "children": children, "t_spawn": t_spawn, "first_protected_polled": first_protected,
        "seal_spread_s": max_seal - min_seal, "protected_after_last_seal_s": all_protected - max_seal,
        "protected_after_first_seal_s": all_protected - min_seal,
        "snapshot_bytes": {i: d["bytes"] for i, d in children.items()},
        "copy_s": {i: d["copy_s"] for i, d in children.items()},
        "encodes": encodes, "protected_log": protected_log, "sealed_log": sealed_log, "segment_allocations": allocs,
        "seal_to_protected_s": to_protected,
        "first_encode_start_after_last_seal_s": (min(e["t_start"] for e in encodes) - max_seal) if encodes else None,
        "last_encode_end_after_last_seal_s": (max(e["t_end"] for e in encodes) - max_seal) if encodes else None,
    }


def measure_rebuild(nodes: list[Node], step: int, timeout: float, chunk_bytes: int | None) -> dict[str, Any]:
    """Lose node LOST_NODE, time its replacement's rebuild; `chunk_bytes` (from the encodes) sizes the plan."""
    node = nodes[LOST_NODE]
    seg, manifest = find_segment(node, step)
    before = hash_segment(seg, int(manifest["data_bytes"]))
    log(f"node {node.index} step {step}: segment {seg.name}, {before['data_bytes']} data bytes, "
        f"xxh3-128 {before['data_xxh3_128']}")
    log(f"node {node.index} loses everything (daemon SIGKILLed, {node.shm} wiped); starting a replacement")
    node.lose_everything()
    survivors = [n for n in nodes if n is not node]
    cpu_before = daemon_cpu_s(survivors)
    t0 = time.time()
    node.start_daemon()
    t_answers = time.time()
    watch = PeakMemory(node.daemon.proc.pid) if node.daemon is not None and node.daemon.proc is not None else None
    client = client_for(node, timeout=timeout)
    try:
        steps = client.list_steps(rank=0, timeout=timeout)
    finally:
        client.close()
    t_listed = time.time()
    peak = watch.stop() if watch is not None else {}
    cpu_after = daemon_cpu_s(survivors)
    rebuild_cpu = (sum(cpu_after[i] - cpu_before.get(i, 0.0) for i in cpu_after)
                   + daemon_cpu_s([node]).get(node.index, 0.0))
    log(f"replacement answered Status after {t_answers - t0:.2f} s; List returned {steps} after {t_listed - t0:.2f} s")
    m = scrape(node)  # a fresh daemon: its counters describe only its own rebuild
    t_scraped = time.time()
    if m is None:
        raise RuntimeError("the replacement's metrics endpoint does not answer")
    rebuilt = m.value("ftd_rebuilds_total", outcome="rebuilt")
    rebuild_sum, rebuild_count = hist(m, "ftd_rebuild_seconds")
    if rebuilt < 1 or rebuild_count < 1 or int(m.value("ftd_rebuilt_step")) != step:
        raise RuntimeError(f"the replacement did not rebuild step {step}: List gave {steps}, rebuilds "
                           f"{m.by_label('ftd_rebuilds_total', 'outcome')}, ftd_rebuilt_step "
                           f"{m.value('ftd_rebuilt_step'):g}, ftd_rebuild_seconds_count {rebuild_count:g}")
    rebuild_s = rebuild_sum / rebuild_count
    decoded_bytes = int(m.value("ftd_ec_decode_bytes_total"))
    log_gbps = decoded_bytes / max(rebuild_s, 1e-9) / 1e9
    peers = int(m.value("ftd_peer_up"))
    seg2, manifest2 = find_segment(node, step)
    after = hash_segment(seg2, int(manifest2["data_bytes"]))
    identical = before["data_xxh3_128"] == after["data_xxh3_128"] and manifest == manifest2
    file_identical = before["file_xxh3_128"] == after["file_xxh3_128"] and before["file_bytes"] == after["file_bytes"]
    log(f"rebuilt in {rebuild_s:.2f} s by the daemon's clock (ftd_rebuild_seconds; {decoded_bytes} bytes "
        f"decoded, ftd_ec_decode_bytes_total: {log_gbps:.2f} GB/s); "
        f"segment {'IDENTICAL' if identical else 'DIFFERENT'} (data), whole file "
        f"{'identical' if file_identical else 'different'}")
    res = {
        "node": node.index, "step": step, "list_steps": steps, "daemon_start_to_status_s": t_answers - t0,
        "daemon_start_to_list_s": t_listed - t0, "rebuild_s": rebuild_s, "decoded_bytes": decoded_bytes,
        "log_gbps": log_gbps, "node_data_bytes": before["data_bytes"],
        "node_data_gbps": before["data_bytes"] / rebuild_s / 1e9 if rebuild_s > 0 else float("inf"),
        "end_to_end_gbps": before["data_bytes"] / (t_listed - t0) / 1e9,
        "before": before, "after": after, "identical": identical, "file_identical": file_identical,
        "rebuilt_line_t": t_scraped, "cpu_s": rebuild_cpu, **peak,
        # start -> List, less the rebuild itself: start, peers' inventories (and List's reply)
        "wait_before_rebuild_s": max(0.0, (t_listed - t0) - rebuild_s),
    }
    if chunk_bytes:
        res["rebuild_plan"] = {"peers": peers, "rotations": int(round(decoded_bytes / chunk_bytes)),
                               "chunk_bytes": chunk_bytes}
    return res


def run_cluster(args: argparse.Namespace, gib: float, shape: ECShape) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ftd-ec-bench-"))
    nodes: list[Node] = []
    result: dict[str, Any] = {"workdir": str(tmp)}
    try:
        nodes = make_nodes(tmp, args.nodes, str(shape), FTD_KEEP=str(args.keep),
                           FTD_BULK_ENCRYPT="1" if args.bulk_encrypt else "0",
                           FTD_PREALLOCATE="1" if args.preallocate else "0", FTD_CODEC=args.codec)
        result["daemon_env"] = {k: v for k, v in nodes[0].env.items() if k.startswith("FTD_")
                                and k not in ("FTD_CLUSTER_TOKEN", "FTD_NODE", "FTD_SOCKET", "FTD_SHM_DIR")}
        log(f"starting {args.nodes} daemons (EC {shape}, codec {args.codec}, keep {args.keep}, preallocate "
            f"{int(args.preallocate)}), shm under {nodes[0].shm.parent}")
        t0 = time.perf_counter()
        for node in nodes:
            node.start_daemon()
        log(f"daemons answer after {time.perf_counter() - t0:.1f} s: pids "
            f"{[n.daemon.proc.pid for n in nodes if n.daemon and n.daemon.proc]}")
        cpu_before = daemon_cpu_s(nodes)
        prot = measure_protection(nodes, gib, args.timeout, args.rpc_timeout, shape)
        cpu_after = daemon_cpu_s(nodes)
        prot["daemon_cpu_s"] = sum(cpu_after[i] - cpu_before.get(i, 0.0) for i in cpu_after)
        prot["protected_bytes"] = sum(prot["snapshot_bytes"].values())
        result["protection"] = prot
        log(f"every node reports step {STEP} protected {prot['protected_after_last_seal_s']:.2f} s after the last seal")

        time.sleep(0.5)  # let parity bookkeeping (drop_except) settle
        mem = {}
        for node in nodes:
            files = node_files(node)
            snap = prot["snapshot_bytes"][node.index]
            files["snapshot_bytes"] = snap
            files["segments_x"] = files["segment_bytes"] / snap
            files["parity_x"] = files["parity_bytes"] / snap
            proc = psutil.Process(node.daemon.proc.pid) if node.daemon and node.daemon.proc else None
            if proc is not None:
                mi = proc.memory_info()
                files["daemon_rss"], files["daemon_shared"] = mi.rss, getattr(mi, "shared", 0)
            mem[node.index] = files
            log(f"  node {node.index}: {files['segments']} segment(s) {files['segment_bytes'] / GIB:.3f} GiB "
                f"= {files['segments_x']:.2f}x snapshot, {files['parity_files']} parity file(s) "
                f"{files['parity_bytes'] / GIB:.3f} GiB = {files['parity_x']:.3f}x; daemon RSS "
                f"{files.get('daemon_rss', 0) / GIB:.2f} GiB ({files.get('daemon_shared', 0) / GIB:.2f} shared)")
        result["memory"] = mem

        if args.nodes > LOST_NODE:
            chunks = [e["chunk_bytes"] for e in prot["encodes"]]
            result["rebuild"] = measure_rebuild(nodes, STEP, args.timeout,
                                                int(statistics.median(chunks)) if chunks else None)
            after = node_files(nodes[LOST_NODE])
            daemon = nodes[LOST_NODE].daemon
            if daemon is not None and daemon.proc is not None:
                mi = psutil.Process(daemon.proc.pid).memory_info()
                after["daemon_rss"], after["daemon_shared"] = mi.rss, getattr(mi, "shared", 0)
            result["memory_after_rebuild"] = {LOST_NODE: after}
            log(f"  replacement node {LOST_NODE}: {after['segments']} segment(s) {after['segment_bytes'] / GIB:.3f} GiB, "
                f"{after['parity_files']} parity file(s) {after['parity_bytes'] / GIB:.3f} GiB; daemon RSS "
                f"{after.get('daemon_rss', 0) / GIB:.2f} GiB ({after.get('daemon_shared', 0) / GIB:.2f} shared)")
            time.sleep(1.0)  # let survivors count anything they have to say about the replacement
        result["daemon_problems"] = {n.index: problems(scrape(n)) for n in nodes}
        result["snapshot_process_stderr"] = {n.index: (n.root / "snapshot.log").read_text(errors="replace")[-2000:]
                                             for n in nodes if (n.root / "snapshot.log").exists()}
        return result
    finally:
        shutdown: dict[int, Any] = {}
        for node in nodes:
            t_stop = time.perf_counter()
            try:
                if node.daemon is not None and node.daemon.proc is not None and node.daemon.proc.poll() is None:
                    node.daemon.stop()  # SIGTERM first: a clean shutdown shows in the log
                    shutdown[node.index] = {"seconds": time.perf_counter() - t_stop,
                                            "returncode": node.daemon.proc.returncode}
            except Exception as exc:  # noqa: BLE001 - always fall through to the kill below
                shutdown[node.index] = {"error": f"{type(exc).__name__}: {exc}"}
        result["shutdown"] = shutdown
        slow = {i: v for i, v in shutdown.items()
                if v.get("error") or v.get("returncode") not in (0, None) or v.get("seconds", 0) > 5}
        if slow:
            log(f"daemon shutdown (SIGTERM) not clean: {slow}")
        if args.keep_logs:
            dest = Path(args.keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for n in nodes:
                for name in ("daemon.log", "snapshot.log"):
                    if (n.root / name).exists():
                        shutil.copyfile(n.root / name, dest / f"node{n.index}-{name}")
            log(f"daemon and snapshot-process logs copied to {dest}")
        for node in nodes:
            node.close()  # SIGKILL anything left, remove the node's shm directory
        shutil.rmtree(tmp, ignore_errors=True)
        left = [n.shm for n in nodes if n.shm.exists()]
        if left:
            log(f"WARNING: shm directories left behind: {left}")


def daemon_cpu_s(nodes: list[Node]) -> dict[int, float]:
    """User + system CPU seconds each live daemon process has used since it started."""
    out: dict[int, float] = {}
    for node in nodes:
        if node.daemon is not None and node.daemon.proc is not None and node.daemon.proc.poll() is None:
            try:
                t = psutil.Process(node.daemon.proc.pid).cpu_times()
                out[node.index] = t.user + t.system
            except psutil.Error:
                pass
    return out


class PeakMemory:
    """Samples a process's RssAnon / RssShmem (/proc/<pid>/status) every 10 ms; `stop` gives the peaks and VmHWM."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_anon, self.peak_shmem = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                st = self._read()
            except OSError:
                return
            self.peak_anon = max(self.peak_anon, st.get("RssAnon", 0))
            self.peak_shmem = max(self.peak_shmem, st.get("RssShmem", 0))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(1.0)
        try:
            hwm = self._read().get("VmHWM", 0)
        except OSError:
            hwm = 0
        return {"peak_rss_anon": self.peak_anon, "peak_rss_shmem": self.peak_shmem, "vm_hwm": hwm}


def single_stream(gib: float, encrypt: bool) -> dict[str, Any] | None:
    """One bulk stream's GET rate over loopback (bench/transport_bench.py, 8 MiB pieces), in this run."""
    out = Path(tempfile.mkdtemp(prefix="ftd-ec-stream-")) / "t.json"
    try:
        subprocess.run([sys.executable, str(Path(__file__).with_name("transport_bench.py")), "--gib", f"{gib:g}",
                        "--chunks", "8", "--repeats", "2", "--json", str(out)], check=True,
                        stdout=subprocess.DEVNULL, timeout=600)
        rows = json.loads(out.read_text())["rows"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
        log(f"single-stream transport measurement failed: {exc}")
        return None
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    label = "CurveZMQ" if encrypt else "plaintext"
    get = [r for r in rows if r["transport"] == label and r["op"] == "GET"]
    return {"transport": label, "gbps": get[0]["median_gbps"], "memcpy_gbps": rows[0]["median_gbps"]} if get else None


def _busy_core_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_core_seconds() -> float:
    """CPU seconds of this process and its waited-for children (daemons, snapshot processes)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


# ---- report ------------------------------------------------------------------------------------


def table(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [line, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), line]
    out += ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells]
    out.append(line)
    return "\n".join(out)


def codec_table(codecs: dict[str, Any]) -> str:
    mc = codecs["memcpy_gbps"]
    cells = []
    for r in codecs["rows"]:
        cells.append((r["codec"], r["op"], f"{r['median_gbps']:.2f}", f"{r['best_gbps']:.2f}",
                      f"{r['median_gbps'] / r.get('memcpy_ref_gbps', mc):.2f}x"))
    return table(("codec (GB/s of k data chunks)", "operation", "GB/s median", "GB/s best",
                  "vs memcpy (same size)"), cells)


def summarize(doc: dict[str, Any]) -> list[Row]:
    k, m = doc["k"], doc["m"]
    c = doc["cluster"]
    p = c["protection"]
    rows: list[Row] = []
    snaps = list(p["snapshot_bytes"].values())
    rows.append(Row("snapshot per node (sealed bytes, rank 0)", f"{median(snaps) / GIB:.3f} GiB x {len(snaps)} nodes"))
    rows.append(Row("snapshot copy into shm per node (min / max)",
                    f"{min(p['copy_s'].values()):.2f} / {max(p['copy_s'].values()):.2f} s "
                    f"({len(snaps)} processes on {os.cpu_count()} cores at once)"))
    allocs = [a["seconds"] for a in p.get("segment_allocations", [])]
    if allocs:
        rows.append(Row("segment pre-fault inside the first Begin RPC (min / max) [m]", f"{min(allocs):.2f} / {max(allocs):.2f} s", "< client rpc_timeout (10 s default)"))
    rows.append(Row("spread of seal times across nodes", f"{p['seal_spread_s']:.2f} s"))
    if p["first_encode_start_after_last_seal_s"] is not None:
        rows.append(Row("last seal -> first rotation encode starts [m, polled]",
                        f"{p['first_encode_start_after_last_seal_s']:.2f} s"))
    enc = p["encodes"]
    if enc:
        secs = [e["seconds"] for e in enc]
        data = enc[0]["k"] * enc[0]["chunk_bytes"]
        rows.append(Row("encode per rotation (pull k chunks + encode + push parity) [m]",
                        ", ".join(f"r{e['rotation']}@n{e['node']} {e['seconds']:.2f}" for e in enc) + " s"))
        rows.append(Row("  ... per-rotation throughput (k chunks / time; median)",
                        f"{data / median(secs) / 1e9:.2f} GB/s of {data / GIB:.3f} GiB"))
        span = max(e["t_end"] for e in enc) - min(e["t_start"] for e in enc)
        pulled = sum(e["k"] * e["chunk_bytes"] for e in enc)
        rows.append(Row("  ... all rotations together (k chunks pulled per rotation, over loopback CURVE)",
                        f"{pulled / 1e9:.2f} GB in {span:.2f} s = {pulled / span / 1e9:.2f} GB/s"))
        rows.append(Row("last seal -> last rotation encoded [m, polled]",
                        f"{p['last_encode_end_after_last_seal_s']:.2f} s"))
    prot = p["protected_after_last_seal_s"]
    rows.append(Row("last seal -> every node reports the step protected", f"{prot:.2f} s",
                    "within 2 training steps", None))
    rows.append(Row("  ... i.e. the target holds if a training step takes at least", f"{prot / 2:.2f} s"))
    stp = list(p.get("seal_to_protected_s", {}).values())
    if stp:
        rows.append(Row("local seal -> protected, each daemon's clock (min / max) [m]", f"{min(stp):.2f} / {max(stp):.2f} s"))
    if p.get("daemon_cpu_s"):
        rows.append(Row("CPU-seconds per GB protected (all daemons: seal, encode, transport, checksums)",
                        f"{p['daemon_cpu_s'] / (p['protected_bytes'] / 1e9):.2f} core-s/GB"))
    mem = c["memory"]
    seg_x = [v["segments_x"] for v in mem.values()]
    par_x = [v["parity_x"] for v in mem.values()]
    nseg = [v["segments"] for v in mem.values()]
    rows.append(Row(f"segments held / snapshot (min-max; {min(nseg)}-{max(nseg)} segment file(s), keep "
                    f"{doc['args']['keep']}, preallocate {int(doc['args']['preallocate'])})",
                    f"{min(seg_x):.3f}-{max(seg_x):.3f}x", "-"))
    rows.append(Row("parity held / snapshot (the EC overhead; min-max)", f"{min(par_x):.3f}-{max(par_x):.3f}x",
                    f"m/k = {m / k:.2f}", max(par_x) <= m / k * 1.02 + 0.01))
    rows.append(Row("total held / snapshot (segments + parity; max)",
                    f"{max(s + q for s, q in zip(seg_x, par_x)):.3f}x",
                    f"1 + m/k = {1 + m / k:.2f} with 1 segment"))
    rss = [v.get("daemon_rss", 0) - v.get("daemon_shared", 0) for v in mem.values()]
    if any(rss):
        rows.append(Row("daemon private RSS after protection (RSS - shared; max)", f"{max(rss) / GIB:.3f} GiB"))
    rb = c.get("rebuild")
    if rb:
        rows.append(Row(f"rebuild of node {rb['node']}: daemon start -> List returns",
                        f"{rb['daemon_start_to_list_s']:.2f} s"))
        if "wait_before_rebuild_s" in rb:
            rows.append(Row("  ... of which before the rebuild starts (start, peers; start -> List - rebuild)",
                            f"{rb['wait_before_rebuild_s']:.2f} s"))
        rows.append(Row("rebuild by the daemon's metrics (records + fetch k pieces + decode, every rotation) [m]",
                        f"{rb['rebuild_s']:.2f} s for {rb['decoded_bytes'] / GIB:.3f} GiB decoded "
                        f"(data + parity chunks) = {rb['log_gbps']:.2f} GB/s"))
        plan = rb.get("rebuild_plan")
        if plan:
            pulled = plan["rotations"] * k * plan["chunk_bytes"]
            rows.append(Row("  ... pulled from peers (k pieces x every rotation)",
                            f"{pulled / 1e9:.2f} GB = {pulled / rb['rebuild_s'] / 1e9:.2f} GB/s into the replacement"))
        rows.append(Row("rebuild throughput of the node's data (snapshot bytes / rebuild s)",
                        f"{rb['node_data_gbps']:.2f} GB/s", f">= {TARGET_REBUILD_GBPS} GB/s",
                        rb["node_data_gbps"] >= TARGET_REBUILD_GBPS))
        rows.append(Row("  ... end to end (snapshot bytes / daemon start -> List)", f"{rb['end_to_end_gbps']:.2f} GB/s"))
        stream = doc.get("single_stream")
        if stream:
            ratio = rb["node_data_gbps"] / stream["gbps"]
            rows.append(Row(f"  ... against one {stream['transport']} stream in this run ({stream['gbps']:.2f} GB/s)",
                            f"{ratio:.2f}x", ">= 0.5x", ratio >= 0.5))
        if rb.get("vm_hwm"):
            data = rb["node_data_bytes"]
            rows.append(Row("replacement daemon's peak memory during rebuild / node data (VmHWM; private RssAnon)",
                            f"{rb['vm_hwm'] / data:.2f}x ({rb['peak_rss_anon'] / GIB:.3f} GiB private)", "<= 1.1x",
                            rb["vm_hwm"] / data <= 1.1))
        if rb.get("cpu_s"):
            rows.append(Row("CPU-seconds per GB rebuilt (all daemons, start -> List)",
                            f"{rb['cpu_s'] / (rb['node_data_bytes'] / 1e9):.2f} core-s/GB"))
        rows.append(Row("rebuilt segment byte-identical (xxh3-128 of data bytes + manifest)",
                        "yes" if rb["identical"] else "NO", "yes", rb["identical"]))
    w = doc["memory_watch"]
    rows.append(Row("peak memory in use, whole machine (change from start)",
                    f"{w['peak_used_gib']:.1f} GiB ({w['peak_added_gib']:+.1f}); /dev/shm peak {w['peak_shm_used_gib']:.1f} GiB",
                    f"<= {RAM_CAP_GIB:.0f} GiB", w["peak_used_gib"] <= RAM_CAP_GIB))
    problems_count = sum(len(v) for v in c.get("daemon_problems", {}).values())
    rows.append(Row("non-zero error counters in daemon metrics [m]", str(problems_count)))
    cpu = doc.get("cpu")
    if cpu:
        rows.append(Row("CPU: this run / other processes on the machine",
                        f"{cpu['this_run_core_s']:.0f} / {cpu['others_core_s']:.0f} core-s of "
                        f"{cpu['available_core_s']:.0f} available"))
    return rows


def render(rows: list[Row]) -> str:
    return table(("metric", "value", "target", "result"), [(r.metric, r.value, r.target, r.verdict) for r in rows])



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, default=4, help="daemons in the loopback cluster")
    p.add_argument("--ec", default="3+1", help="EC shape k+m")
    p.add_argument("--gib", type=float, default=1.0, help="GiB of parameters snapshotted per node")
    p.add_argument("--codec", default="auto", help="daemons' codec: auto, isal or reedsolo")
    p.add_argument("--keep", type=int, default=1, help="FTD_KEEP of the daemons")
    p.add_argument("--bulk-encrypt", type=int, choices=(0, 1), default=1,
                   help="FTD_BULK_ENCRYPT of the daemons (0: authenticated, unencrypted bulk plane)")
    p.add_argument("--preallocate", action="store_true", help="FTD_PREALLOCATE=1 (max(keep, 2) segments per node)")
    p.add_argument("--codec-mib", type=int, default=256, help="MiB per chunk in the codec measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per codec row")
    p.add_argument("--cpu", type=int, default=0, help="CPU the codec measurement is pinned to")
    p.add_argument("--rpc-timeout", type=float, default=60.0,
                   help="FTD_RPC_TIMEOUT of the snapshot processes (Begin pre-faults the first segment "
                        "inside the call: 1 GiB took 6-7 s with 4 nodes on 2 cores, over the tests' 5 s)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds to wait for protection / rebuild")
    p.add_argument("--skip-codecs", action="store_true", help="skip part 1")
    p.add_argument("--keep-logs", default="", help="copy the daemon logs into this directory")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/ec-<date>.json")
    args = p.parse_args(argv)
    if args.nodes < 2 or args.gib <= 0 or args.repeats < 1 or args.keep < 1:
        p.error("--nodes >= 2, --gib > 0, --repeats >= 1, --keep >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = ECShape.parse(args.ec)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally blocks) on SIGTERM too
    group = plan_groups(args.nodes, shape)[0]
    k, m = group.k, group.m
    notes: list[str] = [
        f"daemons run with FTD_KEEP={args.keep} and FTD_PREALLOCATE={int(args.preallocate)} to keep memory down: "
        f"a node then holds 1 segment after one snapshot; with the defaults (keep 2) it holds "
        f"max(keep, 2) = 2 segments, i.e. segments/snapshot ~2x (FTD_SPARE_SEGMENT=1: keep + 1); the EC overhead alone is parity/snapshot (m/k)",
        f"snapshot processes run with FTD_RPC_TIMEOUT={args.rpc_timeout:g} (the tests use 5, the default is 10): "
        f"the daemon pre-faults a new segment inside the Begin RPC, and with 1 GiB per node on this 2-core machine "
        f"that took 6-11 s in trial runs, so a 5 s deadline skipped the snapshot as 'daemon_unavailable'",
        "all daemons, snapshot processes and the bench share this machine's cores: encode, transport (CURVE "
        "encryption on both ends) and decode of 4 nodes compete for the same CPUs",
        "[m]: from the daemons' Prometheus metrics, not their logs. Per-step figures are deltas of a histogram's "
        "_sum and _count between a scrape before the snapshots and one after protection (ftd_ec_encode_seconds, "
        "ftd_ec_encode_bytes_total, ftd_seal_to_protected_seconds); pre-fault is ftd_prefault_seconds sum/count "
        "since each daemon started; the rebuild is the replacement's own ftd_rebuild_seconds and "
        "ftd_ec_decode_bytes_total (its counters start at zero). [polled]: an encode's end is the 0.1 s metrics "
        "poll that first saw its count rise, its start that minus its seconds",
    ]
    if k != shape.k:
        notes.append(f"{args.nodes} nodes with EC {shape}: group 0 runs {k}+{m}")
    machine = dict(common_machine_info(), codecs=available_codecs())
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB RAM, load average "
        f"{machine['loadavg_at_start'][0]:.2f}; ftd {machine['ftd']}, codecs {machine['codecs']}")
    gib = plan_resources(args, k, m, notes)
    watch = MemoryWatch().start()
    cpu0 = _busy_core_seconds(), _own_core_seconds()
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"machine": machine, "args": vars(args), "k": k, "m": m, "gib_per_node": gib, "notes": notes}
    try:
        if not args.skip_codecs:
            doc["codecs"] = measure_codecs(k, m, args.codec_mib, args.repeats, args.cpu)
        doc["single_stream"] = single_stream(min(gib, 1.0), args.bulk_encrypt)
        doc["cluster"] = run_cluster(args, gib, shape)
    finally:
        doc["memory_watch"] = watch.stop()
    doc["total_s"] = time.perf_counter() - t0
    busy, own = _busy_core_seconds() - cpu0[0], _own_core_seconds() - cpu0[1]
    doc["cpu"] = {"machine_busy_core_s": busy, "this_run_core_s": own, "others_core_s": max(0.0, busy - own),
                  "available_core_s": doc["total_s"] * (os.cpu_count() or 1)}
    if busy - own > 0.1 * doc["total_s"] * (os.cpu_count() or 1):
        notes.append(f"other processes on this machine used {busy - own:.0f} core-seconds during the run "
                     f"({(busy - own) / doc['cpu']['available_core_s']:.0%} of the machine): timings are noisy")
    rows = summarize(doc)
    doc["table"] = verdict_table(rows)
    doc["when"] = datetime.datetime.now().isoformat(timespec="seconds")

    print()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB RAM, "
          f"load average at start {machine['loadavg_at_start'][0]:.2f}; {args.nodes} daemons on loopback, EC {k}+{m}, "
          f"codec {args.codec}, {gib:g} GiB per node")
    if "codecs" in doc:
        cd = doc["codecs"]
        print(f"\n1. codecs, {k}+{m}, {cd['chunk_mib']} MiB chunks (reedsolo: 16 MiB), one core; memcpy "
              f"{cd['memcpy_gbps']:.2f} GB/s")
        print(codec_table(cd))
    print("\n2-4. protection, rebuild, memory")
    print(render(rows))
    probs = doc["cluster"].get("daemon_problems", {})
    if any(probs.values()):
        print("\nnon-zero error counters in the daemons' metrics:")
        for i, lines in probs.items():
            for text in lines[:10]:
                print(f"  node {i}: {text.splitlines()[0][:220]}")
            if len(lines) > 10:
                print(f"  node {i}: ... {len(lines) - 10} more")
    print("\nnotes:")
    for n in notes:
        print(f"  - {n}")
    print(f"\nwhole run {doc['total_s']:.0f} s")
    if not args.no_json:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"ec-{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"results in {path}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
