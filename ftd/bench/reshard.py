"""Resharding onto fewer nodes: from the daemons' memory against the durable tier, the same step, one run.

Four loopback nodes (daemon each, EC 3+1, a shared durable directory) train the demo model under
torchrun (FSDP2 or DDP on gloo) and stop at step `--every`, which is both protected in memory and
committed to the durable tier. Node 3 is then lost whole (daemon and memory). Three new ranks
(torchrun on nodes 0-2, `ftd.bench.reshard_child`) each reshard that step twice, timed around the
library call: from memory (`memreshard.restore`: the lost node's ranks decoded by one survivor,
pieces read by byte range locally or from peers) and from the durable tier (`reshard.restore`,
the files' page cache dropped first: a cold read, as after a real failure), and check that both
copies hold the same bytes. A second pass repeats both with everything warm (the lost node
already decoded, the files in the page cache).

    python bench/reshard_bench.py [--dim 512] [--layers 4] [--ddp] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftd.demo.cluster import LocalNode, RendezvousStore, make_nodes, wait_protected
from ftd.durable import layout, reader

JOB = "rsbench"


def _agents(nodes: list[LocalNode], store: RendezvousStore, rdzv: str, args: list[str],
            program: list[str] | None = None, timeout: float = 900) -> None:
    agents = [n.agent(store.port, len(nodes), args, rdzv, max_restarts=0, program=program) for n in nodes]
    for agent in agents:
        if agent.wait(timeout) != 0:
            raise SystemExit("a torchrun agent failed:\n" + "\n".join(n.log.read_text()[-3000:] for n in nodes))


def _read(nodes: list[LocalNode], pattern: str) -> list[dict[str, Any]]:
    """The JSON lines of every node's files matching `pattern`, by rank."""
    out = [json.loads(line) for n in nodes for f in sorted(n.root.glob(pattern))
           for line in f.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda d: d["rank"])


def _set_aside(nodes: list[LocalNode], tag: str) -> None:
    """Rename the nodes' results files so that the next pass writes fresh ones."""
    for n in nodes:
        for f in n.root.glob("results-*.jsonl"):
            f.rename(f.with_name(f"{tag}-{f.name}"))


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    durable = root / "durable"
    durable.mkdir(parents=True)
    model = ["--dim", str(args.dim), "--layers", str(args.layers), *([] if args.ddp else ["--fsdp"])]
    nodes = make_nodes(root / "cluster", 4, "3+1", job=JOB, FTD_DURABLE_DIR=str(durable),
                       FTD_DURABLE_EVERY=str(args.every), FTD_PEER_TIMEOUT="2", FTD_LOG_LEVEL="INFO",
                       FTD_RUN="rsbench")  # one run across the three launches: memory steps obey the run identity
    store = RendezvousStore(timeout_s=300)
    try:
        for n in nodes:
            n.start_daemon()
        t0 = time.perf_counter()
        print(f"[1/3] 4 nodes train {args.every} steps ({'DDP' if args.ddp else 'FSDP2'}, dim {args.dim}, "
              f"{args.layers} layers)", flush=True)
        _agents(nodes, store, "train", ["--steps", str(args.every), *model])
        wait_protected(nodes, args.every, timeout=300)
        deadline = time.monotonic() + 300
        while args.every not in reader.committed_steps(layout.job_dir(durable, JOB)):
            if time.monotonic() > deadline:
                raise SystemExit(f"step {args.every} never became durable")
            time.sleep(0.2)
        print(f"      step {args.every} protected and durable ({time.perf_counter() - t0:.0f} s)", flush=True)
        print("[2/3] node 3 is lost (daemon and memory); 3 ranks reshard from memory, then from the durable "
              "tier (cold)", flush=True)
        nodes[3].lose_everything()
        _set_aside(nodes[:3], "train")
        child = ["-m", "ftd.bench.reshard_child"]
        _agents(nodes[:3], store, "cold", [*model, "--steps", str(args.every)], program=child)
        _set_aside(nodes[:3], "cold")
        print("[3/3] again, warm: the lost node already decoded, the files in the page cache", flush=True)
        _agents(nodes[:3], store, "warm", [*model, "--steps", str(args.every), "--warm"], program=child)
        warm = _read(nodes[:3], "results-*.jsonl")
        cold = _read(nodes[:3], "cold-results-*.jsonl")
        adopted = sum(n.metrics().value("ftd_adopted_bytes_total") for n in nodes[:3])
    finally:
        for n in nodes:
            n.close()
        store.stop()
    return {"dim": args.dim, "layers": args.layers, "mode": "ddp" if args.ddp else "fsdp2", "step": args.every,
            "cold": sorted(cold, key=lambda d: d["rank"]), "warm": sorted(warm, key=lambda d: d["rank"]),
            "adopted_bytes": adopted}


def report(doc: dict[str, Any]) -> str:
    lines = [f"reshard 4 -> 3 nodes of step {doc['step']} ({doc['mode']}, dim {doc['dim']}, {doc['layers']} layers); "
             f"node 3's data decoded by a survivor: {doc['adopted_bytes'] / 2**20:.1f} MiB"]
    for name in ("cold", "warm"):
        ranks = doc[name]
        if not ranks:
            lines.append(f"{name}: no results")
            continue
        mem = max(r["memory_wall_s"] for r in ranks)
        dur = max(r["durable_wall_s"] for r in ranks)
        steps = sorted({(r["memory_step"], r["durable_step"]) for r in ranks})
        lines.append(f"{name}: (memory step, durable step) restored: {steps}")
        lines.append(f"{name}: memory {mem:.3f} s, durable {dur:.3f} s (slowest rank, barrier to barrier): "
                     f"{dur / max(mem, 1e-9):.1f}x faster from memory; same bytes on every rank: "
                     f"{all(r['same_bytes'] for r in ranks)}")
        lines.append(f"  {'rank':>4}  {'state MiB':>9}  {'local MiB':>9}  {'peers MiB':>9}  {'decoded MiB':>11}  "
                     f"{'moved/state':>11}  {'memory s':>8}  {'durable s':>9}")
        for r in ranks:
            m = r["moved"]
            moved = m.get("local", 0) + m.get("peers", 0)
            lines.append(f"  {r['rank']:>4}  {r['local_state_bytes'] / 2**20:>9.1f}  {m.get('local', 0) / 2**20:>9.1f}  "
                         f"{m.get('peers', 0) / 2**20:>9.1f}  {m.get('decoded', 0) / 2**20:>11.1f}  "
                         f"{moved / max(r['local_state_bytes'], 1):>11.2f}  {r['memory_s']:>8.3f}  "
                         f"{r['durable_s']:>9.3f}")
        lines.append(f"  median memory {statistics.median(r['memory_s'] for r in ranks):.3f} s, "
                     f"durable {statistics.median(r['durable_s'] for r in ranks):.3f} s; one-off setup common to "
                     f"both (untimed): {statistics.median(r.get('setup_s', 0.0) for r in ranks):.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ddp", action="store_true", help="DDP replicas instead of FSDP2 shards")
    p.add_argument("--every", type=int, default=4, help="the step trained, protected and made durable")
    p.add_argument("--out-dir", default="", help="write reshard-<time>.json and .txt here")
    p.add_argument("--workdir", default="", help="keep the nodes' logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.workdir:
        doc = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="ftd-reshard-") as tmp:
            doc = run(args, Path(tmp))
    text = report(doc)
    print(text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"reshard-{stamp}.json").write_text(json.dumps(doc, indent=2))
        (out / f"reshard-{stamp}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
