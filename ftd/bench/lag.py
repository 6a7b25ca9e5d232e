"""Protection lag under fast steps: how far the protected step trails the newest sealed one.

    python bench/lag_bench.py [--nodes 3] [--ec 2+1] [--mib 4] [--period 0.03] [--seconds 30]

A loopback cluster of `--nodes` real `ftd daemon` processes (ftd.demo.cluster.make_nodes), one
writer process per node snapshotting a `--mib` MiB tensor through `ftd.Snapshotter` every
`--period` seconds for `--seconds`, all on one wall clock (step s at the same moment on every
node, as synchronous training seals it). Every `--poll` seconds this process scrapes each daemon's
metrics (never its logs):

- lag in steps: the node's newest sealed step (ftd_newest_sealed_step, its ranks' maximum) minus
  its protected step (ftd_newest_protected_step);
- lag in seconds: ftd_protection_lag_seconds (the time between the local seals of the protected
  step and of the newest one; absent from daemons that predate it, then null) and, for every
  daemon, the lag in steps times the measured step period;

each as median / p90 / max over the samples after `--warmup` seconds of steps (and after the node's
first protected step). The bound
it is held against is one encode (mean ftd_ec_encode_seconds over the run) plus one heartbeat
interval. Also: encodes and protections per node (ftd_ec_encode_seconds_count,
ftd_seal_to_protected_seconds_count: with one agreed step per round each encode protects a step),
the announcer's targets by reason (ftd_protection_targets_total) and mean seal -> protected.
Writes bench/results/lag-<date>[-label].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftd.demo.cluster import LocalNode, Metrics, make_nodes

WRITER = r"""
import json, sys, time
import torch
import ftd

mib, period, seconds, start = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
t = torch.zeros(int(mib * (1 << 20)) // 4)
holder = torch.nn.Module()
holder.w = torch.nn.Parameter(t, requires_grad=False)
snap = ftd.Snapshotter(holder, rank=0, world_size=1)  # job and socket from FTD_JOB / FTD_SOCKET
time.sleep(max(0.0, start - time.time()))  # every node's step s at the same moment, as in synchronous training
t0 = time.monotonic()
step = 0
while time.monotonic() - t0 < seconds:
    step += 1
    holder.w.data.add_(1.0)
    snap.snapshot(step)
    time.sleep(max(0.0, start + step * period - time.time()))
snap.wait()
stats = snap.stats
snap.close()
print(json.dumps({"steps": step, "sealed": stats.sealed, "skipped": stats.skipped,
                  "skip_reasons": dict(stats.skip_reasons), "seconds": time.monotonic() - t0}), flush=True)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quantiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "p90": None, "max": None, "samples": 0}
    ordered = sorted(xs)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max": ordered[-1], "samples": len(ordered)}


def scrape(node: LocalNode) -> Metrics | None:
    try:
        return node.metrics()
    except OSError:
        return None


def sample(node: LocalNode, m: Metrics) -> dict[str, Any]:
    sealed = max(m.by_label("ftd_newest_sealed_step", "rank").values(), default=-1)
    names = {n for n, _, _ in m.samples}
    return {"node": node.index, "sealed": int(sealed), "protected": int(m.value("ftd_newest_protected_step")),
            "lag_s": m.value("ftd_protection_lag_seconds") if "ftd_protection_lag_seconds" in names else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ftd-lag-bench-"))
    nodes = make_nodes(tmp, args.nodes, args.ec, job="lagbench", FTD_HEARTBEAT_INTERVAL=repr(args.heartbeat),
                       FTD_PREALLOCATE="0", FTD_LOG_LEVEL="WARNING")
    doc: dict[str, Any] = {"options": vars(args), "workdir": str(tmp)}
    writers: list[subprocess.Popen[bytes]] = []
    try:
        for node in nodes:
            node.start_daemon()
        log(f"{args.nodes} daemons up (EC {args.ec}, heartbeat {args.heartbeat} s); writers: {args.mib} MiB every "
            f"{args.period * 1000:.0f} ms for {args.seconds} s")
        start = time.time() + args.start_delay  # time for every writer to import torch and connect
        for node in nodes:
            err = open(node.root / "writer.log", "wb")
            writers.append(subprocess.Popen([sys.executable, "-c", WRITER, repr(args.mib), repr(args.period),
                                             repr(args.seconds), repr(start)], env=node.env, stdout=subprocess.PIPE,
                                            stderr=err, start_new_session=True))
            err.close()
        rows: list[dict[str, Any]] = []
        while any(w.poll() is None for w in writers):
            t = time.time() - start  # seconds since the writers' first step
            for node in nodes:
                m = scrape(node)
                if m is not None and t >= 0:
                    rows.append({"t": round(t, 3), **sample(node, m)})
            time.sleep(max(0.0, args.poll - (time.time() - start - t)))
        doc["writers"] = []
        for w in writers:
            out, _ = w.communicate(timeout=60)
            doc["writers"].append(json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else
                                  {"returncode": w.returncode})
        time.sleep(1.0)
        finals = {n.index: scrape(n) for n in nodes}
        doc["samples"] = rows
        doc.update(summarize(args, rows, finals, doc["writers"]))
        return doc
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
        for node in nodes:
            node.close()
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(args: argparse.Namespace, rows: list[dict[str, Any]], finals: dict[int, Metrics | None],
              writers: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = statistics.median(w.get("seconds", args.seconds) for w in writers)
    steps = statistics.median(w.get("steps", 0) for w in writers)
    period = seconds / steps if steps else args.period
    live = [r for r in rows if r["protected"] >= 0 and r["sealed"] >= 0 and r["t"] >= args.warmup]
    lag_steps = [float(max(0, r["sealed"] - r["protected"])) for r in live]
    gauge = [r["lag_s"] for r in live if r["lag_s"] is not None and r["lag_s"] >= 0]
    per_node: dict[int, dict[str, Any]] = {}
    encode_sum = encode_count = 0.0
    targets: dict[str, float] = {}
    for index, m in finals.items():
        if m is None:
            per_node[index] = {"error": "metrics unreadable at the end"}
            continue
        es, ec = m.value("ftd_ec_encode_seconds_sum"), m.value("ftd_ec_encode_seconds_count")
        ps, pc = m.value("ftd_seal_to_protected_seconds_sum"), m.value("ftd_seal_to_protected_seconds_count")
        encode_sum, encode_count = encode_sum + es, encode_count + ec
        for reason, v in m.by_label("ftd_protection_targets_total", "reason").items():
            targets[reason] = targets.get(reason, 0.0) + v
        per_node[index] = {"encodes": int(ec), "protections": int(pc), "encode_mean_s": es / ec if ec else None,
                           "seal_to_protected_mean_s": ps / pc if pc else None,
                           "final_protected": int(m.value("ftd_newest_protected_step")),
                           "thread_errors": m.value("ftd_thread_errors_total")}
    encode_mean = encode_sum / encode_count if encode_count else None
    bound = (encode_mean or 0.0) + args.heartbeat
    return {"step_period_s": period, "heartbeat_s": args.heartbeat, "encode_mean_s": encode_mean,
            "bound_s": bound, "lag_steps": quantiles(lag_steps),
            "lag_s_from_steps": quantiles([s * period for s in lag_steps]),
            "lag_s_gauge": quantiles(gauge) if gauge else None, "targets": targets, "nodes": per_node}


def report(doc: dict[str, Any]) -> str:
    def q(d: dict[str, Any] | None, unit: str, scale: float = 1.0) -> str:
        if not d or d["median"] is None:
            return "-"
        return f"{d['median'] * scale:.2f} / {d['p90'] * scale:.2f} / {d['max'] * scale:.2f} {unit}"

    lines = ["=" * 72,
             f"protection lag: {doc['options']['nodes']} nodes, EC {doc['options']['ec']}, "
             f"{doc['options']['mib']} MiB per rank, a step every {doc['step_period_s'] * 1000:.0f} ms "
             f"(label {doc['options']['label'] or '-'})",
             f"lag, steps (median / p90 / max)           {q(doc['lag_steps'], 'steps')}",
             f"lag, s (steps x period)                   {q(doc['lag_s_from_steps'], 's')}",
             f"lag, s (ftd_protection_lag_seconds)       {q(doc['lag_s_gauge'], 's')}",
             f"bound: one encode + one heartbeat         {doc['bound_s']:.3f} s (encode mean "
             f"{(doc['encode_mean_s'] or 0) * 1000:.0f} ms, heartbeat {doc['heartbeat_s'] * 1000:.0f} ms)",
             f"targets announced by reason               {doc['targets'] or '-'}"]
    for index, n in sorted(doc["nodes"].items()):
        if "error" in n:
            lines.append(f"node {index}: {n['error']}")
            continue
        stp = n["seal_to_protected_mean_s"]
        lines.append(f"node {index}: {n['encodes']} encodes, {n['protections']} protections, seal -> protected mean "
                     f"{stp if stp is None else round(stp, 3)} s, final protected step {n['final_protected']}")
    lines.append("=" * 72)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--ec", default="2+1")
    ap.add_argument("--mib", type=float, default=4.0, help="MiB each rank snapshots per step")
    ap.add_argument("--period", type=float, default=0.03, help="seconds between steps")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--heartbeat", type=float, default=0.2, help="FTD_HEARTBEAT_INTERVAL (the demo cluster's)")
    ap.add_argument("--start-delay", type=float, default=8.0, help="seconds until the writers' common first step")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of steps left out of the lag figures "
                    "(daemons and writers settling)")
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between metric scrapes")
    ap.add_argument("--label", default="", help="appended to the results file name (e.g. before)")
    ap.add_argument("--out-dir", default="bench/results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    print(report(doc))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.label}" if args.label else ""
    out = out_dir / f"lag-{datetime.date.today().isoformat()}{suffix}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0 if all("error" not in n and n["protections"] > 0 for n in doc["nodes"].values()) else 1
