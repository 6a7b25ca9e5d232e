"""Restore benchmark: verified restore against a memcpy of the same bytes, warm and in a fresh process.

    flock /tmp/ftd-bench.lock python bench/restore_bench.py [--gib 1] [--repeats 5] [--cold 3]

A real `ftd daemon` runs as a separate process; this process builds a training state of about
`--gib` GiB (fp32 parameters of a few nn.Linear layers plus AdamW's exp_avg and exp_avg_sq) and
seals one snapshot of it. Measured in the same run:

* memcpy: Tensor.copy_ of the state tensors into already-touched buffers (the reference);
* mapping the sealed segment read-only: MAP_POPULATE, madvise(MADV_POPULATE_READ), MADV_WILLNEED,
  faulting on demand, and reading it with pread instead (what restore now does);
* warm restore into the live model and optimizer (verified), split into map / verify / load /
  apply, with this process's memory growth (private RssAnon vs shared RssShmem, peak and after);
* cold restore: a fresh child process builds a new model and a fresh AdamW (no state) and restores
  once, the first restore of that process, split the same way plus the optimizer-state allocation;
  its bytes are compared with the parent's (xxh3 of every tensor);
* the same warm and cold restores done the way restore worked before (MAP_POPULATE, verify of the
  mapping, copy out of it), for a same-run comparison.

Prints a table and writes bench/results/restore-<date>.json. The daemon and its shm are removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch

import ftd
from ftd.bench import common
from ftd.bench import restore as rb
from ftd.bench.common import GIB, Row, build_model, build_optimizer, log, machine_info, median, nbytes_of

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_VS_MEMCPY = 2.0  # a verified restore takes at most 2x a memcpy of the same bytes


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    machine = machine_info()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['loadavg_at_start'][0]:.2f}")
    raw: dict[str, Any] = {}
    ws = common.Workspace.create()
    job = f"rbench-{uuid.uuid4().hex[:8]}"
    snap = None
    try:
        with common.running_daemon(ws, job) as (env, _daemon):
            torch.manual_seed(0)
            model = build_model(int(args.gib * GIB), args.layers)
            opt = build_optimizer(model)
            tensors = common.state_tensors(model, opt)
            nbytes = nbytes_of(tensors)
            raw["state_bytes"] = nbytes
            log(f"state: {nbytes / GIB:.3f} GiB; sealing one snapshot")
            snap = ftd.Snapshotter(model, opt, job=job, socket=env["FTD_SOCKET"], rank=0, world_size=1)
            snap.snapshot(1)
            if not snap.wait(120) or snap.stats.last_sealed_step != 1:
                raise RuntimeError(f"the snapshot was not sealed: {dict(snap.stats.skip_reasons)}")
            reply = snap.client.open(1)
            data_bytes = json.loads(reply.manifest_json)["data_bytes"]
            raw["segment_bytes"] = data_bytes
            digests = rb.digests(tensors)

            raw["memcpy_s"] = rb.memcpy_s(tensors, args.repeats)
            log(f"memcpy: median {median(raw['memcpy_s']):.3f} s")
            raw["mapping"] = rb.mapping_s(reply.path, data_bytes)
            log("mapping: " + ", ".join(f"{k} {v:.3f}" for k, v in raw["mapping"].items()))

            warm, legacy_warm = [], []
            for i in range(args.repeats):  # interleaved, so drift hits both alike
                warm.append(rb.ftd_restore(snap.client, job, model, opt))
                legacy_warm.append(rb.legacy_restore(snap.client, job, 1, model, opt))
                log(f"warm restore {i + 1}: {warm[-1]['total_s']:.3f} s (before: {legacy_warm[-1]['total_s']:.3f} s)")
            raw["warm"], raw["warm_before"] = warm, legacy_warm
            raw["warm_bit_exact"] = rb.digests(common.state_tensors(model, opt)) == digests

            spec = {"job": job, "socket": env["FTD_SOCKET"], "nbytes": int(args.gib * GIB), "layers": args.layers,
                    "step": 1, "digests": digests}
            cold, legacy_cold = [], []
            for i in range(args.cold):
                cold.append(rb.cold_restore({**spec, "measure_alloc": True}))
                legacy_cold.append(rb.cold_restore({**spec, "legacy": True}))
                log(f"cold restore {i + 1}: {cold[-1]['total_s']:.3f} s (before: {legacy_cold[-1]['total_s']:.3f} s)")
            raw["cold"], raw["cold_before"] = cold, legacy_cold
            snap.close(timeout=10)
            snap = None
    finally:
        if snap is not None:
            snap.close(timeout=10)
        ws.remove()
    return summarize(raw), {"machine": machine, "args": vars(args), "raw": raw}


def summarize(raw: dict[str, Any]) -> list[Row]:
    memcpy = median(raw["memcpy_s"])
    mapping = raw["mapping"]
    warm, warm_before = rb.summarize_runs(raw["warm"]), rb.summarize_runs(raw["warm_before"])
    cold, cold_before = rb.summarize_runs(raw["cold"]), rb.summarize_runs(raw["cold_before"])
    alloc = median([c["optimizer_alloc_touch_s"] for c in raw["cold"]])
    gib = raw["state_bytes"] / GIB

    def ms(s: float) -> str:
        return f"{s * 1000:.0f} ms"

    def mib(n: float) -> str:
        return f"{n / 2**20:+.0f} MiB"

    def split(r: dict[str, Any]) -> str:
        return ", ".join(f"{k.removesuffix('_s')} {ms(v)}" for k, v in r.items() if k.endswith("_s") and k not in ("total_s", "startup_s", "optimizer_alloc_touch_s"))

    def mem(r: dict[str, Any]) -> str:
        m = r["memory"]
        return (f"private peak {mib(m['private_peak'])} (after {mib(m['private_after'])}), "
                f"shared peak {mib(m['shared_peak'])} (after {mib(m['shared_after'])})")

    cold_less_alloc = cold["total_s"] - cold.get("allocate_s", 0.0)
    cold_bound = TARGET_VS_MEMCPY * memcpy + cold.get("map_s", 0.0)
    rows = [
        Row(f"memcpy of the state ({gib:.2f} GiB) into touched buffers (median)", ms(memcpy)),
        Row("map read-only, MAP_POPULATE", ms(mapping["map_populate_s"])),
        Row("map read-only, madvise(MADV_POPULATE_READ)", ms(mapping["map_madv_populate_read_s"])),
        Row("map read-only, madvise(MADV_WILLNEED) (no page tables built)", ms(mapping["map_madv_willneed_s"])),
        Row("faulting every page on demand (hash with faults - hash mapped)", ms(mapping["fault_on_demand_s"])),
        Row("pread + xxh3 of the segment, 1 thread, no mapping", ms(mapping["pread_hash_1_thread_s"])),
        Row("warm restore, verified (median)", ms(warm["total_s"]), f"<= {TARGET_VS_MEMCPY:.0f}x memcpy",
            warm["total_s"] <= TARGET_VS_MEMCPY * memcpy),
        Row("warm restore / memcpy", f"{warm['total_s'] / memcpy:.2f}x"),
        Row("warm restore split", split(warm)),
        Row("warm restore memory", mem(warm)),
        Row("warm restore before (populate + verify + copy)", f"{ms(warm_before['total_s'])} = "
            f"{warm_before['total_s'] / memcpy:.2f}x memcpy; {split(warm_before)}"),
        Row("warm restore before, memory", mem(warm_before)),
        Row("warm restore bit-exact", "yes" if raw["warm_bit_exact"] else "NO", "yes", raw["warm_bit_exact"]),
        Row("cold restore in a fresh process (median)", ms(cold["total_s"])),
        Row("cold restore / memcpy", f"{cold['total_s'] / memcpy:.2f}x"),
        Row("cold restore less its optimizer-state allocation / memcpy",
            f"{cold_less_alloc / memcpy:.2f}x", f"<= {TARGET_VS_MEMCPY:.0f}x memcpy + map",
            cold_less_alloc <= cold_bound),
        Row("cold restore split", split(cold)),
        Row("fresh optimizer state: allocate + first touch, same bytes, after the restore", ms(alloc)),
        Row("cold restore memory", mem(cold)),
        Row("cold restore before (populate + verify + copy)", f"{ms(cold_before['total_s'])} = "
            f"{cold_before['total_s'] / memcpy:.2f}x memcpy; {split(cold_before)}"),
        Row("cold restore before, memory", mem(cold_before)),
        Row("cold restore bit-exact", "yes" if all(c["bit_exact"] for c in raw["cold"]) else "NO", "yes",
            all(c["bit_exact"] for c in raw["cold"] + raw["cold_before"])),
    ]
    return rows


def render(rows: list[Row]) -> str:
    width = max(len(r.metric) for r in rows)
    return "\n".join(f"{r.metric:<{width}}  {r.value}" + (f"   [{r.target}: {r.verdict}]" if r.ok is not None else "")
                     for r in rows)


def write_json(rows: list[Row], doc: dict[str, Any], out: Path | None) -> Path:
    path = out or RESULTS_DIR / f"restore-{datetime.date.today().isoformat()}.json"
    return common.write_results(path, doc, rows, [
        "memory: RssAnon is private, RssShmem the segment's shared pages mapped into the process",
        "cold restores run in fresh child processes: new model, fresh AdamW, the process's first restore",
        "'before' repeats the sequence restore ran previously: MAP_POPULATE, verify, copy out of the map"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="size of params + AdamW state, GiB")
    p.add_argument("--layers", type=int, default=4, help="number of square nn.Linear layers")
    p.add_argument("--repeats", type=int, default=5, help="warm restores (and memcpy repeats)")
    p.add_argument("--cold", type=int, default=3, help="cold restores (fresh processes) of each kind")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default bench/results/restore-<date>.json)")
    args = p.parse_args(argv)
    if args.gib <= 0 or args.repeats < 1 or args.cold < 1 or args.layers < 1:
        p.error("--gib > 0, --repeats, --cold and --layers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    need = int(args.gib * GIB * 5)  # state, a copy, the segment, a child's state
    if psutil.virtual_memory().available < need:
        raise SystemExit(f"not enough memory for --gib {args.gib}: need about {need / GIB:.1f} GiB")
    t0 = time.perf_counter()
    rows, doc = run(args)
    doc["total_s"] = time.perf_counter() - t0
    path = write_json(rows, doc, args.out)
    print()
    print(render(rows))
    print(f"\nwhole run {doc['total_s']:.0f} s; results in {path}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
