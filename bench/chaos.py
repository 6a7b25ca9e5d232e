"""Chaos run: random SIGKILLs of ranks, daemons and whole nodes during one elastic torchrun job.

    python bench/chaos.py [--kills 50] [--nodes 3] [--ec 2+1] [--steps N] [--step-sleep 0.02] [--seed S]

The run itself is ftd.demo.chaos (also `ftd demo --chaos N`); this script adds the flags and writes
bench/results/chaos-<date>.json, with the protection lag (each node's newest sealed step against its
protected step, in steps and seconds, sampled from the daemons' metrics between kills and during
recoveries) in "lag" and the samples in "lag_samples". Exit status 0 only when every recovery ended bit-exact, nothing hung
and training finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftd.demo.chaos import ChaosOptions, run_chaos  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--ec", default="2+1")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: 80 per kill + 300)")
    ap.add_argument("--step-sleep", type=float, default=0.02)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None, help="chaos RNG seed (default: random, printed)")
    ap.add_argument("--weights", default="50,25,25", help="rank,daemon,node kill weights")
    ap.add_argument("--min-wait", type=float, default=0.5)
    ap.add_argument("--max-wait", type=float, default=5.0)
    ap.add_argument("--recovery-lines", type=int, default=3,
                    help="recovery is visible once every rank wrote this many loss lines after the kill")
    ap.add_argument("--recovery-timeout", type=float, default=180.0, help="seconds; beyond it a recovery is a HANG")
    ap.add_argument("--finish-timeout", type=float, default=900.0)
    ap.add_argument("--lost-threshold", type=int, default=50,
                    help="a kill after which training restarts more than this many steps back counts as progress lost")
    ap.add_argument("--lag-poll", type=float, default=0.5,
                    help="seconds between samples of every daemon's protection lag (from its metrics)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    weights = tuple(float(w) for w in args.weights.split(","))
    opts = ChaosOptions(kills=args.kills, nodes=args.nodes, ec=args.ec, steps=args.steps, step_sleep=args.step_sleep,
                        train_seed=args.train_seed, seed=args.seed, weights=weights,  # type: ignore[arg-type]
                        min_wait=args.min_wait, max_wait=args.max_wait, recovery_lines=args.recovery_lines,
                        recovery_timeout=args.recovery_timeout, finish_timeout=args.finish_timeout,
                        lost_threshold=args.lost_threshold, lag_poll=args.lag_poll)
    result = run_chaos(opts)
    print()
    print(result.table())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"chaos-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result.to_json(), indent=2))
    print(f"wrote {out}")
    if result.ok and not args.keep:
        shutil.rmtree(result.workdir, ignore_errors=True)
    else:
        print(f"work dir kept for inspection: {result.workdir}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
