"""The `ftd` command: `ftd daemon`, `ftd status`, `ftd ls`, `ftd rm`, `ftd export`, `ftd merge`, `ftd demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ftd._version import __version__
from ftd.config import CLIENT, DAEMON, ClientConfig, DaemonConfig, add_arguments, overrides_from
from ftd.errors import FtdError

log = logging.getLogger("ftd")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s ftd[%(process)d] %(levelname)s %(name)s: %(message)s")


def cmd_daemon(args: argparse.Namespace) -> int:
    from ftd.daemon.server import Daemon

    config = DaemonConfig.load(**overrides_from(args, DAEMON))
    _setup_logging(config.log_level)
    daemon = Daemon(config).start()

    stopping = []

    def stop(signum: int, frame: Any) -> None:
        if stopping:  # a second SIGTERM/SIGINT while shutting down changes nothing
            return
        stopping.append(signum)
        log.info("signal %d: stopping", signum)
        daemon.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not daemon.wait(1.0):
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ftd.client.rpc import DaemonClient

    config = ClientConfig.load(**overrides_from(args, CLIENT))
    client = DaemonClient(config.socket, config.job, 0, config.rpc_timeout, config.daemon_user,
                          config.socket_dir_private)
    try:
        st = client.status()
    finally:
        client.close()
    doc = {"job": st.job, "node": st.node, "version": st.version, "shm_dir": st.shm_dir,
           "held_bytes": st.held_bytes, "budget_bytes": st.budget_bytes, "available_bytes": st.available_bytes,
           "ranks": [{"rank": r.rank, "sealed_steps": list(r.sealed_steps), "held_bytes": r.held_bytes,
                      "writing": r.writing} for r in st.ranks],
           "node_index": st.node_index, "group": list(st.group), "ec": st.ec,
           "protected_step": st.protected_step, "rebuilding": st.rebuilding,
           "durable_dir": st.durable_dir, "durable_step": st.durable_step,
           "peers": [{"node": p.node, "endpoint": p.endpoint, "up": p.up, "protected_step": p.protected_step,
                      "rebuilding": p.rebuilding, "ranks": list(p.ranks), "steps": list(p.steps),
                      "parity_chunks": p.parity_chunks, "seconds_since_heartbeat": round(p.seconds_since_heartbeat, 3)}
                     for p in st.peers],
           "reshards": [{"rank": r.rank, "step": r.step, "old_world_size": r.old_world_size,
                         "world_size": r.world_size, "bytes_local": r.bytes_local, "bytes_peers": r.bytes_peers,
                         "bytes_decoded": r.bytes_decoded, "seconds": round(r.seconds, 3), "at": r.at}
                        for r in st.reshards]}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"ftd {st.version}  job {st.job}  node {st.node}  socket {config.socket}")
    budget = f"{st.budget_bytes / 2**30:.2f} GiB" if st.budget_bytes else "none"
    print(f"shm {st.shm_dir}: {st.held_bytes / 2**20:.1f} MiB held, budget {budget}, "
          f"host available {st.available_bytes / 2**30:.1f} GiB")
    print(f"{'rank':>6}  {'sealed steps':<24} {'held MiB':>10}  writing")
    for r in doc["ranks"]:
        print(f"{r['rank']:>6}  {str(r['sealed_steps']):<24} {r['held_bytes'] / 2**20:>10.1f}  {r['writing']}")
    for r in doc["reshards"]:
        print(f"rank {r['rank']} resharded step {r['step']} from world {r['old_world_size']} onto "
              f"{r['world_size']} in {r['seconds']:.2f} s: {r['bytes_local'] / 2**20:.1f} MiB from this node's "
              f"memory, {r['bytes_peers'] / 2**20:.1f} MiB from peers ({r['bytes_decoded'] / 2**20:.1f} MiB decoded "
              f"from a lost node's parity)")
    if st.durable_dir:
        newest = st.durable_step if st.durable_step >= 0 else "none yet"
        print(f"durable tier {st.durable_dir}: newest committed step {newest}")
    if st.node_index >= 0:
        state = "rebuilding" if st.rebuilding else f"newest protected step {st.protected_step}"
        print(f"EC {st.ec}: node {st.node_index} in group {list(st.group)}, {state}")
        if args.cluster:
            print(f"{'node':>6}  {'endpoint':<24} {'up':<5} {'protected':<10} {'ranks':<10} {'steps held':<16} "
                  f"parity  heartbeat")
            print(f"{st.node_index:>6}  {'(this node)':<24} {'True':<5} {st.protected_step:<10} "
                  f"{str([r['rank'] for r in doc['ranks']]):<10} {'-':<16} -       -")
            for p in doc["peers"]:
                protected = "rebuilding" if p["rebuilding"] else p["protected_step"]
                ago = f"{p['seconds_since_heartbeat']:.1f} s ago" if p["seconds_since_heartbeat"] >= 0 else "never"
                print(f"{p['node']:>6}  {p['endpoint']:<24} {str(p['up']):<5} {str(protected):<10} "
                      f"{str(p['ranks']):<10} {str(p['steps']):<16} {p['parity_chunks']:<7} {ago}")
        else:
            print(f"{'peer':>6}  {'endpoint':<24} {'up':<5} protected")
            for p in doc["peers"]:
                print(f"{p['node']:>6}  {p['endpoint']:<24} {str(p['up']):<5} "
                      f"{'rebuilding' if p['rebuilding'] else p['protected_step']}")
    return 0


def _shm_dir(args: argparse.Namespace) -> str:
    import os

    return args.shm_dir or os.environ.get("FTD_SHM_DIR") or "/dev/shm"


STATUS_TIMEOUT_S = 2.0  # what `ftd ls` waits for each live daemon's Status (its durable directory)


def _daemon_durable_root(job: str) -> Path | None:
    """The durable job directory the live daemon of `job` reports (default socket of the job, or
    FTD_SOCKET); None when it has none or cannot be asked."""
    from ftd.client.rpc import DaemonClient

    try:
        config = ClientConfig.load(job=job)
        client = DaemonClient(config.socket, job, -1, STATUS_TIMEOUT_S, config.daemon_user,
                              config.socket_dir_private)
        try:
            st = client.status(STATUS_TIMEOUT_S)
        finally:
            client.close()
    except FtdError as exc:
        log.debug("job %s: no durable directory from its daemon: %s", job, exc)
        return None
    return Path(st.durable_dir) if st.job == job and st.durable_dir else None


def _durable_steps(args: argparse.Namespace, live_jobs: list[str]) -> list[tuple[str, Path, list[dict[str, Any]]]]:
    """(job, durable job directory, committed steps) from --durable-dir / FTD_DURABLE_DIR (every job there)
    and from each live daemon's Status; a directory without committed steps is left out."""
    from ftd.durable.reader import describe

    roots: dict[str, tuple[str, Path]] = {}
    top = args.durable_dir or os.environ.get("FTD_DURABLE_DIR")
    if top:
        top_path = Path(os.path.abspath(top))
        try:
            children = sorted(top_path.iterdir()) if top_path.is_dir() else []
        except OSError as exc:
            raise FtdError(f"cannot list the durable directory {top_path}: {exc.strerror}") from None
        for child in children:
            if child.is_dir() and not child.is_symlink():
                roots.setdefault(os.path.realpath(child), (child.name, child))
    for job in live_jobs:
        root = _daemon_durable_root(job)
        if root is not None:
            roots.setdefault(os.path.realpath(root), (job, root))
    found = []
    for job, root in sorted(roots.values()):
        try:
            steps = describe(root)
        except OSError as exc:  # another user's job directory on a shared filesystem
            log.debug("durable directory %s: %s", root, exc)
            continue
        if steps:
            found.append((job, root, steps))
    return found


def _when(seconds: object) -> str:
    import time

    if not isinstance(seconds, (int, float)) or seconds <= 0:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seconds))} ({time.time() - seconds:.0f} s ago)"


def cmd_ls(args: argparse.Namespace) -> int:
    import time

    from ftd.admin import scan

    jobs = scan(_shm_dir(args))
    durable = _durable_steps(args, [j.job for j in jobs if j.daemon_live])
    if args.json:
        docs = [dict(j.to_json(), durable=[]) for j in jobs]
        by_job = {doc["job"]: doc for doc in docs}
        for job, root, steps in durable:
            if job not in by_job:  # only in the durable tier: nothing of it in this node's memory
                by_job[job] = {"job": job, "path": None, "owner_uid": None, "daemon_live": False, "ranks": {},
                               "runs": [], "segment_bytes": 0, "newest_seal": 0.0, "problems": [], "durable": []}
                docs.append(by_job[job])
            by_job[job]["durable"].append({"dir": str(root), "steps": steps})
        print(json.dumps(docs, indent=2))
        return 0
    if not jobs:
        print(f"no ftd job directories under {_shm_dir(args)}")
    else:
        print(f"{'job':<24} {'daemon':<7} {'owner':>6} {'ranks':>5}  {'steps (rank 0 or first)':<24} {'MiB':>9}  "
              f"{'newest seal':<12} runs")
    for j in jobs:
        first = j.ranks[min(j.ranks)] if j.ranks else []
        age = f"{time.time() - j.newest_seal:.0f} s ago" if j.newest_seal else "-"
        runs = ",".join(r or "(none)" for r in sorted(j.runs)) or "-"
        print(f"{j.job:<24} {'live' if j.daemon_live else 'none':<7} {j.owner_uid:>6} {len(j.ranks):>5}  "
              f"{str(first):<24} {j.segment_bytes / 2**20:>9.1f}  {age:<12} {runs}")
        for problem in j.problems[:5]:
            print(f"    ! {problem}")
    if durable:
        print()
        print(f"{'durable (committed)':<24} {'step':>12} {'world':>6} {'MiB':>10}  {'committed':<34} directory")
        for job, root, steps in durable:
            for d in steps:
                print(f"{job:<24} {d['step']:>12} {str(d['world_size']):>6} {d['bytes'] / 2**20:>10.1f}  "
                      f"{_when(d['committed_at']):<34} {root}")
    elif args.durable_dir or os.environ.get("FTD_DURABLE_DIR"):
        print(f"no committed durable steps under {os.path.abspath(args.durable_dir or os.environ['FTD_DURABLE_DIR'])}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ftd.admin import JOB_PREFIX, daemon_live, remove_job_files
    from ftd.client.rpc import DaemonClient
    from ftd.config import parse_job

    job = parse_job(args.job)
    job_dir = Path(_shm_dir(args)) / f"{JOB_PREFIX}{job}"
    if not os.path.lexists(job_dir):
        raise FtdError(f"nothing is held for job {job!r} under {_shm_dir(args)}")
    if not daemon_live(job_dir):
        freed = remove_job_files(job_dir)
        print(f"removed {job_dir} ({freed / 2**20:.1f} MiB; no daemon was serving it)")
        return 0
    config = ClientConfig.load(job=job, **({"socket": args.socket} if args.socket else {}))
    client = DaemonClient(config.socket, job, -1, config.rpc_timeout, config.daemon_user, config.socket_dir_private)
    try:
        dropped = client.discard(-1)
    finally:
        client.close()
    print(f"discarded {len(dropped)} snapshot(s) of job {job!r} through the daemon on {config.socket} "
          f"(steps {sorted(set(dropped))}); its memory is given back")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import time

    from ftd.client.rpc import DaemonClient
    from ftd.errors import DaemonUnavailable

    config = ClientConfig.load(**overrides_from(args, CLIENT))
    target = args.dir or config.durable_dir
    if not target:
        raise FtdError("give the directory to export to (or set FTD_DURABLE_DIR / --durable-dir)")
    target = os.path.abspath(os.path.expanduser(target))  # the daemon resolves nothing relative to its own cwd
    client = DaemonClient(config.socket, config.job, -1, config.rpc_timeout, config.daemon_user,
                          config.socket_dir_private)
    t0 = time.monotonic()
    try:
        reply = client.export(args.step, target, args.timeout)
    except DaemonUnavailable:
        if time.monotonic() - t0 < args.timeout:
            raise
        raise FtdError(f"the export of step {args.step} did not finish within --timeout {args.timeout:g} s; the "
                       "daemon stopped it (a step missing ranks is never committed): run it again with more "
                       "time") from None
    finally:
        client.close()
    if args.json:
        print(json.dumps({"job": config.job, "step": args.step, "path": reply.path, "ranks": list(reply.ranks),
                          "bytes": reply.bytes, "world_size": reply.world_size, "committed": reply.committed,
                          "already_committed": reply.already_committed,
                          "missing_ranks": list(reply.missing_ranks)}, indent=2))
        return 0
    if reply.already_committed:
        print(f"step {args.step} of job {config.job!r} is already committed in {reply.path} (ranks "
              f"{list(reply.ranks)} of this node hold the same snapshots); nothing written")
        return 0
    print(f"wrote ranks {list(reply.ranks)} of step {args.step} ({reply.bytes / 2**20:.1f} MiB) to {reply.path}")
    if reply.committed:
        print(f"step {args.step} is committed: all {reply.world_size} ranks are there (torch.distributed.checkpoint "
              f"loads it; daemons with FTD_DURABLE_DIR={target} restore from it)")
    else:
        missing = list(reply.missing_ranks)
        print(f"not committed yet: ranks {missing} of {reply.world_size} are missing; run `ftd export {args.step} "
              f"{target}` on the node(s) that hold them, the last one commits the step")
    return 0


def _steps_arg(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps are comma-separated integers, got {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError("no steps given")
    return steps


def cmd_merge(args: argparse.Namespace) -> int:
    from ftd.merge import describe, merge_steps

    config = ClientConfig.load(**{k: v for k in ("job", "socket", "durable_dir")
                                  if (v := getattr(args, k)) is not None})
    _setup_logging(config.log_level)
    if args.memory:
        durable_dir = None
    elif config.durable_dir:
        durable_dir = config.durable_dir
    else:
        raise FtdError("say where the steps are: --durable-dir D (or FTD_DURABLE_DIR), or --memory for the "
                       "snapshots this node's daemon holds")
    result = merge_steps(job=config.job, out=args.out, durable_dir=durable_dir, socket=config.socket,
                         steps=args.steps, last=args.last, method=args.method, decay=args.decay, metric=args.metric,
                         temperature=args.temperature, penalty=args.penalty, maximize=args.maximize,
                         include_optim=args.include_optim)
    print(json.dumps(result.to_json(), indent=2) if args.json else describe(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    workdir = Path(args.workdir) if args.workdir else None
    if args.chaos:
        from ftd.demo.chaos import ChaosOptions, run_chaos

        result = run_chaos(ChaosOptions(kills=args.chaos, nodes=args.nodes, ec=args.ec, seed=args.seed,
                                        workdir=workdir))
        print(result.table())
        return 0 if result.ok else 1
    from ftd.demo.cluster_demo import DemoOptions, run_cluster_demo

    faults = tuple(f for f in args.faults.split(",") if f) if args.faults != "none" else ()
    return run_cluster_demo(DemoOptions(nodes=args.nodes, ec=args.ec, steps=args.steps, faults=faults, dim=args.dim,
                                       layers=args.layers, step_sleep=args.step_sleep, workdir=workdir))


def cmd_bench(argv: list[str]) -> int:
    from ftd.bench.compare import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftd", description="In-memory fault tolerance for training jobs.")
    parser.add_argument("--version", action="version", version=f"ftd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    daemon = sub.add_parser("daemon", help="run the snapshot manager of this node")
    add_arguments(daemon, DAEMON)
    daemon.set_defaults(func=cmd_daemon)
    status = sub.add_parser("status", help="summarise what a daemon holds")
    add_arguments(status, CLIENT)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--cluster", action="store_true", help="also show every peer of this node's EC group "
                        "(from their heartbeats)")
    status.set_defaults(func=cmd_status)
    ls = sub.add_parser("ls", help="list the jobs whose snapshots this node's shm directory holds")
    ls.add_argument("--shm-dir", default=None, help="the daemons' FTD_SHM_DIR [default /dev/shm]")
    ls.add_argument("--durable-dir", default=None, help="also list the committed steps of every job under this "
                    "durable directory [FTD_DURABLE_DIR]; a live daemon's own durable directory is listed anyway")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls.set_defaults(func=cmd_ls)
    rm = sub.add_parser("rm", help="discard every snapshot of a job on this node (through its daemon when one "
                        "runs, else by removing its directory)")
    rm.add_argument("job", help="the job id (as `ftd ls` shows it)")
    rm.add_argument("--shm-dir", default=None, help="the daemon's FTD_SHM_DIR [default /dev/shm]")
    rm.add_argument("--socket", default=None, help="the daemon's socket [FTD_SOCKET, default by the job id]")
    rm.set_defaults(func=cmd_rm)
    export = sub.add_parser(
        "export", help="write a step this node's daemon holds to a directory as a durable checkpoint "
        "(safetensors that torch.distributed.checkpoint loads); on a multi-node job run it on every node, like "
        "`ftd rm`: each daemon writes its own ranks and the last one commits the step",
        description="Write STEP, as held in this node's shared memory, to DIR/<job>/step-<STEP> in the durable "
        "tier's format. Each daemon writes only the ranks of its node: on a multi-node job run `ftd export STEP "
        "DIR` on every node with the same DIR (a shared filesystem); the step is committed once every rank of "
        "the job is there. Exporting into FTD_DURABLE_DIR subjects the step to its retention (FTD_DURABLE_KEEP).")
    add_arguments(export, CLIENT)
    export.add_argument("step", type=int, help="a step every rank of this node holds (`ftd status` lists them)")
    export.add_argument("dir", nargs="?", default=None, help="an existing directory (not a symlink), seen by every "
                        "node [default FTD_DURABLE_DIR]")
    export.add_argument("--timeout", type=float, default=600.0, help="seconds the export may take [600]")
    export.add_argument("--json", action="store_true", help="print JSON for scripts")
    export.set_defaults(func=cmd_export)
    merge = sub.add_parser(
        "merge", help="average steps of one run (uniform, EMA, metric-weighted) into a checkpoint that stock "
        "tools load: safetensors of the model's weights, or a DCP directory in the durable tier's format",
        description="Merge steps of a job, from the durable tier (every file verified) or from this node's "
        "memory (--memory: the daemon must hold every rank), in float64, rounded once to each tensor's dtype. "
        "uniform: the mean; ema: m = d*m + (1-d)*x from the oldest step (m = x_oldest first); weighted: "
        "p_i proportional to exp(-(v_i - min v)/T) for a metric recorded with snapshot(step, metrics=...), or "
        "exp(-penalty*(s_newest - s_i)) with --metric step. Integer and bool tensors and optimizer step "
        "counters take the newest step's value. An --out ending in .safetensors gets the model's weights "
        "(keys as model.state_dict() names them); any other --out becomes a directory that "
        "torch.distributed.checkpoint loads (HuggingFaceStorageReader). A JSON of what was merged goes beside.")
    merge.add_argument("--job", default=None, help="the job id [FTD_JOB, else $SLURM_JOB_ID, else 'default']")
    merge.add_argument("--durable-dir", default=None, help="the durable directory holding the job's steps "
                       "[FTD_DURABLE_DIR]")
    merge.add_argument("--memory", action="store_true", help="merge steps this node's daemon holds in memory "
                       "instead (a single-node job; on several nodes `ftd export` them and merge from the directory)")
    merge.add_argument("--socket", default=None, help="the daemon's socket, with --memory [FTD_SOCKET]")
    which = merge.add_mutually_exclusive_group(required=True)
    which.add_argument("--steps", type=_steps_arg, default=None, help="comma-separated steps, e.g. 100,200,300")
    which.add_argument("--last", type=int, default=None, metavar="N", help="the newest N steps")
    merge.add_argument("--method", choices=("uniform", "ema", "weighted"), default="uniform")
    merge.add_argument("--decay", type=float, default=0.9, help="ema: the decay d in [0, 1) [0.9]")
    merge.add_argument("--metric", default="loss", help="weighted: a metric recorded with the snapshots, or "
                       "'step' [loss]")
    merge.add_argument("--temperature", type=float, default=1.0, help="weighted by a metric: T of "
                       "softmax(-v/T) [1]")
    merge.add_argument("--maximize", action="store_true", help="weighted by a metric: higher is better "
                       "(softmax(v/T))")
    merge.add_argument("--penalty", type=float, default=None, help="weighted by step: lambda of "
                       "exp(-lambda*(s_newest - s_i)) (required with --metric step)")
    merge.add_argument("--include-optim", action="store_true", help="also merge the optimizer state (into a "
                       "DCP directory output; a .safetensors output holds the model only)")
    merge.add_argument("--out", action="append", required=True, metavar="PATH", help="X.safetensors (model "
                       "weights) or a directory to create (DCP format); may be given twice")
    merge.add_argument("--json", action="store_true", help="print what was merged as JSON")
    merge.set_defaults(func=cmd_merge)
    demo = sub.add_parser("demo", help="a local cluster of daemons and torchrun agents trains through a rank crash, "
                          "a daemon crash and a node loss, then compares bit for bit with a failure-free run")
    demo.add_argument("--nodes", type=int, default=4, help="simulated nodes (a daemon + a torchrun agent each)")
    demo.add_argument("--ec", default="2+1", help="erasure code k+m across the nodes")
    demo.add_argument("--steps", type=int, default=160)
    demo.add_argument("--faults", default="rank,daemon,node", help="comma-separated: rank, daemon, node (or none)")
    demo.add_argument("--dim", type=int, default=64, help="model width")
    demo.add_argument("--layers", type=int, default=2, help="transformer blocks")
    demo.add_argument("--step-sleep", type=float, default=0.05, help="seconds each step sleeps (slows the run "
                      "so that failures strike at visible moments)")
    demo.add_argument("--chaos", type=int, default=0, metavar="N", help="instead: N random SIGKILLs of ranks, "
                      "daemons and nodes (the chaos run), then the bit-exact check")
    demo.add_argument("--seed", type=int, default=None, help="chaos seed (default: random, printed)")
    demo.add_argument("--workdir", default=None, help="keep files here (default: a temporary directory)")
    demo.set_defaults(func=cmd_demo)
    # `ftd bench` needs torch and more; its flags live in ftd.bench.compare, imported only when used
    # (the daemon must start without importing torch).
    bench = sub.add_parser("bench", add_help=False, help="compare ftd with torch.save, DCP and torchsnapshot "
                           "(ftd bench --help for its flags)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # parsed by ftd.bench.compare itself
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FtdError as exc:
        print(f"ftd {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
