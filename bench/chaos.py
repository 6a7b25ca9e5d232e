"""Chaos run: random SIGKILLs of ranks, daemons and whole nodes during one elastic torchrun job.

    python bench/chaos.py [--kills 50] [--nodes 3] [--ec 2+1] [--steps N] [--step-sleep 0.02] [--seed S]

N simulated nodes on loopback (the recipe of tests/integration/test_torchrun_elastic.py): a TCPStore
outside the nodes, one ftd daemon and one torchrun agent (c10d rendezvous, one worker) per node.
Kinds of kill, chosen with weights:
  rank   - SIGKILL the worker process of one node (its agent restarts the group)
  daemon - SIGKILL one daemon and restart it at once with the same env (its shm memory survives)
  node   - SIGKILL agent + worker tree + daemon, wipe the node's shm dir, then start a replacement
           daemon and agent with the same node identity
Between kills: wait until recovery is visible (every rank has written new losses since the kill),
then a random 0.5-5 s. A recovery past --recovery-timeout is a HANG (reported; the run stops).
At the end training runs to completion and every recorded loss of every (rank, step) in every node's
loss file, and the final parameters, are compared bit for bit with a reference run without ftd.
Results go to bench/results/chaos-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from ftd.demo.procs import ftd_env, start_trainer  # noqa: E402
from tests.integration.multinode import Node, free_port, make_nodes  # noqa: E402

KINDS = ("rank", "daemon", "node")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start_store(port: int) -> subprocess.Popen[bytes]:
    code = ("import torch.distributed as d, datetime, time; "
            f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, multi_tenant=True, wait_for_workers=False, "
            "timeout=datetime.timedelta(seconds=300)); time.sleep(1e9)")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def train_args(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--step-sleep", str(args.step_sleep), "--seed", str(args.train_seed)]


def start_agent(node: Node, port: int, job: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = dict(node.env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nodes}", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}",
           f"--max-restarts={args.max_restarts}",
           "--rdzv-conf=is_host=0,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300",
           "--monitor-interval=0.5", "-m", "ftd.demo.train", *train_args(args),
           "--losses", str(node.losses), "--out", str(node.root / "params-{rank}.pt")]
    with open(node.log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    node.trainers.append(proc)
    return proc


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a dying machine would."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def workers_of(agent: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        kids = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if "ftd.demo.train" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


class Losses:
    """Incrementally tails every node's loss file; keeps every (rank, step) -> set of recorded losses,
    and a per-rank count of lines seen (to tell when every rank has made progress)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.offsets = {p: 0 for p in paths}
        self.partial = {p: b"" for p in paths}
        self.seen: dict[tuple[int, int], set[str]] = defaultdict(set)
        self.lines_per_rank: Counter[int] = Counter()
        self.max_step = -1
        self.bad_lines = 0
        self.min_since_mark = None  # lowest step written since mark(): where the group restarted from
        self.max_since_mark = None  # highest step written since mark(): the group's current frontier
        self._front = -1

    def frontier(self) -> int:
        return self._front if self.max_since_mark is None else self.max_since_mark

    def mark(self) -> int:
        """Start a new interval; return the frontier (highest step written in the interval just ended)."""
        self.poll()
        self._front = self.frontier()
        self.min_since_mark = self.max_since_mark = None
        return self._front

    def poll(self) -> None:
        for p in self.paths:
            if not p.exists():
                continue
            with open(p, "rb") as f:
                f.seek(self.offsets[p])
                data = f.read()
            if not data:
                continue
            self.offsets[p] += len(data)
            data = self.partial[p] + data
            *lines, self.partial[p] = data.split(b"\n")
            for line in lines:
                try:
                    doc = json.loads(line)
                except ValueError:  # a line cut short by SIGKILL
                    self.bad_lines += 1
                    continue
                self.seen[(doc["rank"], doc["step"])].add(doc["loss"])
                self.lines_per_rank[doc["rank"]] += 1
                self.max_step = max(self.max_step, doc["step"])
                if self.min_since_mark is None or doc["step"] < self.min_since_mark:
                    self.min_since_mark = doc["step"]
                if self.max_since_mark is None or doc["step"] > self.max_since_mark:
                    self.max_since_mark = doc["step"]


def all_losses(paths: list[Path]) -> dict[tuple[int, int], set[str]]:
    tail = Losses(paths)
    tail.poll()
    return tail.seen


def reference_run(root: Path, args: argparse.Namespace) -> tuple[dict[tuple[int, int], set[str]], Path]:
    root.mkdir()
    master = free_port()
    procs = []
    for rank in range(args.nodes):
        env = dict(ftd_env(root, "ref"), RANK=str(rank), WORLD_SIZE=str(args.nodes), LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
        # step-sleep only sleeps; it cannot change a bit, so the reference runs without it
        ref_args = ["--steps", str(args.steps), "--seed", str(args.train_seed)]
        procs.append(start_trainer([*ref_args, "--no-ftd", "--losses", str(root / f"l{rank}.jsonl"),
                                    "--out", str(root / "p-{rank}.pt")], env, root / "train.log"))
    try:
        for p in procs:
            if p.wait(1800) != 0:
                raise RuntimeError("reference run failed:\n" + (root / "train.log").read_text()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return all_losses([root / f"l{r}.jsonl" for r in range(args.nodes)]), root / "p-0.pt"


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
    ap.add_argument("--max-restarts", type=int, default=100000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.steps <= 0:
        args.steps = 80 * args.kills + 300
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(args.seed)
    weights = [float(w) for w in args.weights.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ftd-chaos-"))
    log(f"chaos: {args.kills} kills, {args.nodes} nodes, EC {args.ec}, {args.steps} steps, "
        f"step-sleep {args.step_sleep}, seed {args.seed}, work dir {work}")
    t_start = time.monotonic()

    log("reference run (no ftd) ...")
    t0 = time.monotonic()
    reference, ref_params = reference_run(work / "reference", args)
    log(f"reference done in {time.monotonic() - t0:.1f} s ({len(reference)} (rank, step) losses)")

    cluster = work / "cluster"
    cluster.mkdir()
    nodes = make_nodes(cluster, args.nodes, args.ec)
    port = free_port()
    store = start_store(port)
    agents: list[subprocess.Popen[bytes]] = []
    kills: list[dict] = []
    hangs: list[dict] = []
    errors: list[str] = []
    finished_ok = False
    tail = Losses([n.losses for n in nodes])
    t_chaos = time.monotonic()

    def alive_check() -> str | None:
        for i, a in enumerate(agents):
            if a.poll() is not None and a.returncode != 0:
                return f"agent of node {i} exited with {a.returncode}"
        return None

    def training_done() -> bool:
        return all(a.poll() == 0 for a in agents)

    try:
        for node in nodes:
            node.start_daemon()
        agents = [start_agent(node, port, "chaos", args) for node in nodes]
        # first: all ranks training
        deadline = time.monotonic() + args.recovery_timeout
        while min((tail.lines_per_rank[r] for r in range(args.nodes)), default=0) < args.recovery_lines:
            tail.poll()
            if (msg := alive_check()) or time.monotonic() > deadline:
                raise RuntimeError(msg or "training did not start")
            time.sleep(0.1)
        log(f"training running (step {tail.max_step}) after {time.monotonic() - t_chaos:.1f} s")

        for k in range(args.kills):
            time.sleep(rng.uniform(args.min_wait, args.max_wait))
            tail.poll()
            if training_done() or tail.frontier() >= args.steps - 10:
                log(f"training (nearly) finished at step {tail.max_step}; stopping chaos after {k} kills")
                break
            kind = rng.choices(KINDS, weights)[0]
            i = rng.randrange(args.nodes)
            node = nodes[i]
            step_at_kill = tail.mark()
            before = {r: tail.lines_per_rank[r] for r in range(args.nodes)}
            t_kill = time.monotonic()
            info: dict = {"n": k + 1, "kind": kind, "node": i, "max_step_at_kill": step_at_kill,
                          "t": round(t_kill - t_chaos, 2)}
            if kind == "rank":
                ws = workers_of(agents[i])
                if not ws:
                    info["note"] = "no worker found (between restarts); killed nothing"
                for w in ws:
                    info["pid"] = w.pid
                    try:
                        w.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
            elif kind == "daemon":
                info["pid"] = node.daemon.proc.pid if node.daemon and node.daemon.proc else None
                node.daemon.kill()
                for attempt in range(5):
                    try:
                        node.start_daemon()
                        break
                    except Exception as e:  # noqa: BLE001
                        log(f"  daemon restart attempt {attempt + 1} failed: {e}")
                        time.sleep(1)
                else:
                    raise RuntimeError(f"daemon of node {i} would not restart")
            else:
                info["pid"] = agents[i].pid
                kill_tree(agents[i].pid)
                node.lose_everything()
                node.start_daemon()
                agents[i] = start_agent(node, port, "chaos", args)
            log(f"kill {k + 1}/{args.kills}: {kind} on node {i} (pid {info.get('pid')}) at step {step_at_kill}")
            # wait for recovery: every rank has written new losses since the kill
            deadline = t_kill + args.recovery_timeout
            while True:
                tail.poll()
                if all(tail.lines_per_rank[r] - before[r] >= args.recovery_lines for r in range(args.nodes)):
                    break
                if training_done():
                    break
                if (msg := alive_check()):
                    raise RuntimeError(f"after kill {k + 1}: {msg}")
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            rec = time.monotonic() - t_kill
            info["recovery_s"] = round(rec, 2)
            info["restart_step"] = tail.min_since_mark
            if tail.min_since_mark is not None and step_at_kill - tail.min_since_mark > args.lost_threshold:
                info["progress_lost"] = step_at_kill - tail.min_since_mark
                log(f"  PROGRESS LOST: group went back from step {step_at_kill} to {tail.min_since_mark}")
            if time.monotonic() > deadline:
                info["hang"] = True
                hangs.append(info)
                kills.append(info)
                log(f"  HANG: no recovery within {args.recovery_timeout} s after kill {k + 1} "
                    f"(new lines per rank: {[tail.lines_per_rank[r] - before[r] for r in range(args.nodes)]})")
                break
            kills.append(info)
            log(f"  recovered in {rec:.2f} s (restarted at step {tail.min_since_mark}, now step {tail.frontier()})")
            tail.mark()  # the next frontier counts only steps written after the recovery (not in-flight ones)

        if not hangs:
            log("chaos over; letting training finish ...")
            deadline = time.monotonic() + args.finish_timeout
            while not training_done():
                if (msg := alive_check()):
                    raise RuntimeError(f"while finishing: {msg}")
                if time.monotonic() > deadline:
                    hangs.append({"kind": "finish", "note": f"training did not finish in {args.finish_timeout} s",
                                  "max_step": tail.max_step})
                    log(f"HANG: training did not finish within {args.finish_timeout} s (step {tail.max_step})")
                    break
                time.sleep(0.2)
                tail.poll()
            else:
                finished_ok = True
                log("training finished")
    except Exception as e:  # noqa: BLE001
        errors.append(f"{type(e).__name__}: {e}")
        log(f"ERROR: {e}")
    finally:
        for node in nodes:
            for a in node.trainers:
                if a.poll() is None:
                    kill_tree(a.pid)
            try:
                node.close()
            except Exception as e:  # noqa: BLE001
                log(f"cleanup of node {node.index}: {e}")
        try:
            os.killpg(store.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        store.wait(30)

    # compare
    tail.poll()
    got = all_losses([n.losses for n in nodes])
    divergences = []
    for key in sorted(got):
        if key not in reference:
            divergences.append({"rank": key[0], "step": key[1], "got": sorted(got[key]), "want": None})
        elif got[key] != reference[key]:
            divergences.append({"rank": key[0], "step": key[1], "got": sorted(got[key]),
                                "want": sorted(reference[key])})
    missing = sorted(set(reference) - set(got))
    param_mismatch = []
    param_files = sorted(cluster.glob("node*/params-*.pt"))
    if finished_ok:
        want = torch.load(ref_params, weights_only=True)
        for path in param_files:
            params = torch.load(path, weights_only=True)
            if set(params) != set(want) or not all(torch.equal(params[k], v) for k, v in want.items()):
                param_mismatch.append(str(path.relative_to(work)))
        if not param_files:
            param_mismatch.append("no parameter files written")
        if missing:
            errors.append(f"{len(missing)} (rank, step) never recorded, e.g. {missing[:5]}")
    wall = time.monotonic() - t_start
    logs = "\n".join(n.log.read_text(errors="replace") for n in nodes if n.log.exists())
    resumes = len(re.findall(r"rank \d+ resumed at step \d+", logs))
    resets = len(re.findall(r"could be restored on every rank; starting from step 0", logs))
    dlogs = "\n".join(n.daemon_log.read_text(errors="replace") for n in nodes if n.daemon_log.exists())
    unrecoverable = len(re.findall(r"memory cannot recover", dlogs))
    lost = [x for x in kills if x.get("progress_lost")]
    rebuilt = sum(len(re.findall(r"rebuilt node", n.daemon_log.read_text(errors="replace")))
                  for n in nodes if n.daemon_log.exists())
    recs = [x["recovery_s"] for x in kills if not x.get("hang")]
    by_kind = Counter(x["kind"] for x in kills)
    rec_by_kind = {kd: [x["recovery_s"] for x in kills if x["kind"] == kd and not x.get("hang")] for kd in KINDS}
    n_div = len(divergences) + len(param_mismatch)

    print()
    print("=" * 64)
    print(f"chaos: {args.nodes} nodes, EC {args.ec}, {args.steps} steps, seed {args.seed}")
    print(f"{'kind':<8} {'kills':>6} {'recovered':>10} {'median s':>9} {'max s':>8}")
    for kd in KINDS:
        r = rec_by_kind[kd]
        print(f"{kd:<8} {by_kind[kd]:>6} {len(r):>10} {statistics.median(r) if r else float('nan'):>9.2f} "
              f"{max(r) if r else float('nan'):>8.2f}")
    print(f"{'total':<8} {len(kills):>6} {len(recs):>10} {statistics.median(recs) if recs else float('nan'):>9.2f} "
          f"{max(recs) if recs else float('nan'):>8.2f}")
    print("-" * 64)
    print(f"recoveries          {len(recs)}")
    print(f"hangs               {len(hangs)}")
    print(f"divergences         {n_div}  ({len(divergences)} (rank, step) losses, {len(param_mismatch)} param files)")
    print(f"losses compared     {len(got)} (rank, step), {sum(len(v) for v in got.values())} distinct values; "
          f"{len(missing)} missing; {tail.bad_lines} torn lines")
    print(f"progress lost       {len(lost)} kills (went back > {args.lost_threshold} steps: "
          f"{[(x['n'], x['kind'], x['max_step_at_kill'], x['restart_step']) for x in lost][:8]})")
    print(f"restarts from 0     {resets} rank log lines 'starting from step 0'; "
          f"{unrecoverable} daemon 'memory cannot recover' lines")
    print(f"resumes logged      {resumes}; daemon 'rebuilt node' lines {rebuilt}")
    print(f"training finished   {finished_ok}")
    print(f"errors              {errors if errors else 'none'}")
    print(f"wall time           {wall:.1f} s (reference {t_chaos - t_start:.1f} s)")
    print("=" * 64)
    for d in divergences[:10]:
        print(f"DIVERGENCE rank {d['rank']} step {d['step']}: got {d['got']} want {d['want']}")
    for p in param_mismatch:
        print(f"DIVERGENCE params: {p}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"chaos-{datetime.date.today().isoformat()}.json"
    result = {"args": vars(args), "work_dir": str(work), "kills": kills, "kills_by_kind": dict(by_kind),
              "recoveries": len(recs), "hangs": hangs, "divergences": divergences[:200],
              "divergent_count": len(divergences), "param_mismatch": param_mismatch,
              "missing": [list(m) for m in missing[:50]], "missing_count": len(missing),
              "recovery_s": {"median": statistics.median(recs) if recs else None, "max": max(recs) if recs else None,
                             "by_kind": {kd: {"median": statistics.median(r) if r else None,
                                              "max": max(r) if r else None} for kd, r in rec_by_kind.items()}},
              "progress_lost": lost, "restarts_from_0_lines": resets, "unrecoverable_lines": unrecoverable,
              "resumes_logged": resumes, "rebuilt_lines": rebuilt, "finished": finished_ok, "errors": errors,
              "wall_s": round(wall, 1)}
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    bad = n_div or hangs or errors or not finished_ok
    if bad or args.keep:
        log(f"work dir kept for inspection: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
