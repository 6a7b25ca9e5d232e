"""`ftd demo`: a local cluster trains a small GPT through a rank crash, a daemon crash and a node loss.

1. a reference run: the same ranks, no ftd, no failures;
2. the cluster: N simulated nodes on loopback, each an `ftd daemon` (own shm directory, EC k+m
   across the nodes) and an elastic torchrun agent (c10d rendezvous on a store off the nodes)
   running one rank. Faults are injected at fixed fractions of the run, each recovered with no
   manual step: the agent restarts the group and every rank restores from its daemon (local
   memory), from the peers (a replaced node's memory is decoded from the others), or keeps going
   (a restarted daemon re-adopts its memory while training continues);
3. a table: failure, recovery source, time to recover, steps lost, and whether every step's loss
   of every rank and the final parameters equal the reference run bit for bit. The same facts go
   to `<workdir>/demo-result.json` (see `DemoResult`).

Recoveries are described from structured sources only: the trainers' results files
(ftd.demo.results: restored step, source and seconds per rank) and the daemons' metrics.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftd.demo import results
from ftd.demo.cluster import (Comparison, LocalNode, LossTail, RendezvousStore, compare, make_nodes,
                              protected_steps, reference_run)
from ftd.errors import FtdError

FAULTS = ("rank", "daemon", "node")
FAULT_AT = {"rank": 0.2, "daemon": 0.4, "node": 0.6}  # fraction of the run at which each fault strikes
RESULT_FILE = "demo-result.json"


@dataclass
class DemoOptions:
    nodes: int = 4
    ec: str = "2+1"
    steps: int = 160
    faults: tuple[str, ...] = FAULTS
    dim: int = 64
    layers: int = 2
    step_sleep: float = 0.05
    recovery_timeout: float = 240.0
    workdir: Path | None = None

    def train_args(self) -> list[str]:
        return ["--steps", str(self.steps), "--dim", str(self.dim), "--layers", str(self.layers)]


@dataclass
class Row:
    """One injected failure and how it was recovered."""

    failure: str
    node: int
    at_step: int
    source: str = "-"
    seconds: float = 0.0
    restore_s: float = 0.0
    restored_step: int | None = None
    ranks_restored: dict[int, str] = field(default_factory=dict)
    segments_adopted: int | None = None  # daemon crash: what the restarted daemon re-adopted (its metrics)

    @property
    def steps_lost(self) -> int:
        """Steps computed before the failure that had to be computed again."""
        return 0 if self.restored_step is None else max(0, self.at_step + 1 - self.restored_step)


@dataclass
class DemoResult:
    """What `ftd demo` found, written as JSON to <workdir>/demo-result.json: one row per failure and the verdict."""

    rows: list[Row]
    comparison: Comparison

    @property
    def bit_exact(self) -> bool:
        return self.comparison.bit_exact

    def to_json(self) -> dict:
        rows = [dict(asdict(r), steps_lost=r.steps_lost) for r in self.rows]
        return {"rows": rows, "comparison": asdict(self.comparison), "bit_exact": self.bit_exact}


class Progress:
    """One bar for the run (a line every 10 % when the output is not a terminal)."""

    def __init__(self, total: int, width: int = 32):
        self.total, self.width, self.tty, self._shown = total, width, sys.stdout.isatty(), -1

    def update(self, done: int, label: str) -> None:
        done = max(0, min(done, self.total))
        if self.tty:
            filled = self.width * done // self.total
            print(f"\r  {label:<10} [{'#' * filled:<{self.width}}] {done}/{self.total} steps", end="", flush=True)
        elif done * 10 // self.total != self._shown * 10 // self.total:
            print(f"  {label:<10} {done}/{self.total} steps", flush=True)
        self._shown = done

    def say(self, msg: str) -> None:
        """A line that stays above the bar."""
        print(("\r\033[K" if self.tty else "") + f"  {msg}", flush=True)


def run_cluster_demo(opts: DemoOptions) -> int:
    """Run the demo; 0 when every failure recovered and the run equals the reference bit for bit."""
    unknown = set(opts.faults) - set(FAULTS)
    if unknown:
        raise FtdError(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    if opts.nodes < 2:
        raise FtdError("the demo needs at least 2 nodes")
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="ftd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"ftd demo: {opts.nodes} nodes (a daemon + a torchrun agent each, EC {opts.ec}), a small GPT "
          f"(dim {opts.dim}, {opts.layers} layers) for {opts.steps} steps; faults: {', '.join(opts.faults) or 'none'}")
    print(f"  files in {work}")

    print("[1/3] reference run: same ranks, no ftd, no failures")
    t0 = time.monotonic()
    reference = reference_run(work / "reference", opts.nodes, opts.train_args())
    print(f"  done in {time.monotonic() - t0:.1f} s")

    print("[2/3] the cluster, failures injected")
    nodes = make_nodes(work / "cluster", opts.nodes, opts.ec, job="demo")
    store = RendezvousStore()
    rows: list[Row] = []
    bar = Progress(opts.steps)
    tail = LossTail([n.losses for n in nodes])
    train = [*opts.train_args(), "--step-sleep", str(opts.step_sleep)]
    agents = []
    try:
        for node in nodes:
            node.start_daemon()
        agents = [node.agent(store.port, opts.nodes, train, "demo") for node in nodes]
        plan = sorted(opts.faults, key=lambda f: FAULT_AT[f])
        for fault in plan:
            _run_until(tail, agents, bar, int(FAULT_AT[fault] * opts.steps), opts.recovery_timeout)
            victim = nodes[{"rank": 1, "daemon": 2, "node": opts.nodes - 1}[fault] % opts.nodes]
            if fault == "node":
                _wait_for_protection(nodes, tail, bar, opts.recovery_timeout)
            rows.append(_inject(fault, victim, nodes, agents, tail, bar, store, opts, train))
        _run_until(tail, agents, bar, opts.steps, opts.recovery_timeout * 2, finish=True)
        bar.update(opts.steps, "training")
        if bar.tty:
            print()
    finally:
        for node in nodes:
            node.close()
        store.stop()

    print("[3/3] compare with the reference, bit for bit")
    tail.poll()
    verdict = compare(reference, tail.seen, sorted((work / "cluster").glob("node*/params-*.pt")))
    (work / RESULT_FILE).write_text(json.dumps(DemoResult(rows, verdict).to_json(), indent=2))
    exact = "yes" if verdict.bit_exact else "NO"
    table = [("failure", "node", "at step", "recovery source", "recovered s", "restore s", "restored step",
              "steps lost", "bit-exact")]
    for row in rows:
        table.append((row.failure, str(row.node), str(row.at_step), row.source, f"{row.seconds:.1f}",
                      f"{row.restore_s:.2f}" if row.restore_s else "-",
                      "-" if row.restored_step is None else str(row.restored_step), str(row.steps_lost), exact))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    print(f"  losses compared: {verdict.compared} (rank, step), {len(verdict.divergent)} differ, "
          f"{len(verdict.missing)} missing; final parameters of {verdict.param_files} ranks, "
          f"{len(verdict.param_mismatch)} differ")
    print("  recovered s: from the failure until every rank trains again (torchrun restart included); "
          "restore s: the slowest rank's restore")
    print("  bit-exact with the failure-free run" if verdict.bit_exact else "  NOT bit-exact: see the files above")
    if verdict.bit_exact and opts.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if verdict.bit_exact else 1


def _check_agents(agents: list) -> None:
    for i, agent in enumerate(agents):
        if agent.poll() not in (None, 0):
            raise FtdError(f"the torchrun agent of node {i} exited with {agent.returncode}")


def _run_until(tail: LossTail, agents: list, bar: Progress, step: int, timeout: float, finish: bool = False) -> None:
    """Show progress until every rank passed `step` (or, with `finish`, until every agent exited 0)."""
    deadline = time.monotonic() + timeout
    while True:
        tail.poll()
        bar.update(tail.frontier() + 1, "training")
        if finish and all(a.poll() == 0 for a in agents):
            return
        if not finish and tail.frontier() >= step:
            return
        _check_agents(agents)
        if time.monotonic() > deadline:
            raise FtdError(f"training did not reach step {step} within {timeout:.0f} s")
        time.sleep(0.1)


def _wait_for_protection(nodes: list[LocalNode], tail: LossTail, bar: Progress, timeout: float) -> None:
    """Before a node loss: wait until every node holds a protected step (else there is nothing to decode)."""
    deadline = time.monotonic() + timeout
    while min(protected_steps(nodes)) < 1:
        tail.poll()
        bar.update(tail.frontier() + 1, "training")
        if time.monotonic() > deadline:
            raise FtdError(f"no step was protected on every node within {timeout:.0f} s")
        time.sleep(0.2)


def _inject(fault: str, victim: LocalNode, nodes: list[LocalNode], agents: list, tail: LossTail, bar: Progress,
            store: RendezvousStore, opts: DemoOptions, train: list[str]) -> Row:
    """Inject one fault, wait until every rank trains again, and describe the recovery."""
    at = tail.mark()
    since = time.time()
    before = dict(tail.lines_per_rank)
    t0 = time.monotonic()
    if fault == "rank":
        workers = victim.workers()
        for worker in workers:
            worker.kill()
        row = Row("rank crash (SIGKILL)", victim.index, at)
        bar.say(f"SIGKILL the rank on node {victim.index} at step {at}")
    elif fault == "daemon":
        assert victim.daemon is not None
        victim.daemon.kill()
        bar.say(f"SIGKILL the daemon of node {victim.index} at step {at}; restarting it")
        victim.start_daemon(attempts=5)
        row = Row("daemon crash (SIGKILL)", victim.index, at)
        row.segments_adopted = int(victim.metrics().value("ftd_segments_adopted_total"))
        row.source = f"own memory ({row.segments_adopted} segments)"
        row.seconds = time.monotonic() - t0
    else:
        bar.say(f"node {victim.index} lost at step {at}: agent, rank and daemon SIGKILLed, its memory wiped")
        victim.lose_everything()
        victim.start_daemon(attempts=5)
        agents[victim.index] = victim.agent(store.port, opts.nodes, train, "demo")
        bar.say(f"replacement node {victim.index} joins (new daemon + agent, empty memory)")
        row = Row("node loss (replaced)", victim.index, at)
    deadline = time.monotonic() + opts.recovery_timeout
    while not all(tail.lines_per_rank[r] - before.get(r, 0) >= 2 for r in range(opts.nodes)):
        tail.poll()
        bar.update(tail.frontier() + 1, "training")
        _check_agents(agents)
        if time.monotonic() > deadline:
            raise FtdError(f"no recovery from the {fault} failure within {opts.recovery_timeout:.0f} s")
        time.sleep(0.05)
    if fault != "daemon":
        row.seconds = time.monotonic() - t0
        for record in results.restores([r for n in nodes for r in n.results()], since):
            if record["restored_step"]:
                row.ranks_restored[record["rank"]] = record["restore_source"]
                row.restored_step = record["restored_step"]
                row.restore_s = max(row.restore_s, record["restore_s"])
        sources = sorted(set(row.ranks_restored.values()))
        counts = {s: list(row.ranks_restored.values()).count(s) for s in sources}
        row.source = ", ".join(f"{s} ({n} rank{'s' if n > 1 else ''})" for s, n in counts.items()) or \
            f"none: restarted at step {tail.min_since_mark}"
        if row.restored_step is None:
            row.restored_step = tail.min_since_mark or 0
    bar.say(f"recovered from the {row.failure} in {row.seconds:.1f} s: {row.source}")
    tail.mark()
    return row
