"""Chaos run: random SIGKILLs of ranks, daemons and whole nodes during one elastic torchrun job.

A local cluster (ftd.demo.cluster): a rendezvous store off the nodes, one daemon and one torchrun
agent (c10d, one worker) per node. Kinds of kill, chosen with weights:

- rank:   SIGKILL the worker of one node (its agent restarts the group, every rank restores);
- daemon: SIGKILL one daemon and start it again at once (its shared memory survives; training
          goes on, snapshots are skipped while it is down);
- node:   SIGKILL the node's agent, worker and daemon, wipe its shm directory, then start a
          replacement daemon and agent with the same node identity (torchrun reassigns ranks;
          the replacement's data comes back by erasure decoding from the peers).

After each kill the run waits until every rank has written new losses (a recovery past
`recovery_timeout` is a hang and ends the run), then a random pause. Finally training runs to the
end and every (rank, step) loss ever recorded and the final parameters are compared bit for bit
with a reference run without ftd.

Protection lag (how far each node's protected step trails its newest sealed step) is sampled from
every daemon's metrics (ftd_newest_sealed_step, ftd_newest_protected_step,
ftd_protection_lag_seconds) every `lag_poll` seconds: "steady" samples are taken in the pauses
between a recovery and the next kill, "recovering" ones while a kill is being recovered from.

Facts come from structured sources, never from log text: each rank's restores from the trainers'
results files (ftd.demo.results), and each restarted or replacement daemon's rebuild outcome and
re-adopted segments from a scrape of its metrics once the group has recovered (a SIGKILL resets a
daemon's counters, so each is read from the daemon that has just recovered).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftd.demo import results
from ftd.demo.cluster import (LocalNode, LossTail, Metrics, RendezvousStore, all_losses, compare, make_nodes,
                              reference_run, stamp)
from ftd.errors import FtdError

KINDS = ("rank", "daemon", "node")


@dataclass
class ChaosOptions:
    kills: int = 50
    nodes: int = 3
    ec: str = "2+1"
    steps: int = 0  # 0: 80 per kill + 300
    step_sleep: float = 0.02
    train_seed: int = 0
    seed: int | None = None
    weights: tuple[float, float, float] = (50.0, 25.0, 25.0)
    kinds: tuple[str, ...] = ()  # a fixed sequence of kinds instead of weighted draws (nodes and moments stay random)
    min_wait: float = 0.5
    max_wait: float = 5.0
    recovery_lines: int = 3
    recovery_timeout: float = 180.0
    finish_timeout: float = 900.0
    reference_timeout: float = 1800.0
    lost_threshold: int = 50
    max_restarts: int = 100000
    lag_poll: float = 0.5
    workdir: Path | None = None

    def train_args(self) -> list[str]:
        return ["--steps", str(self.steps), "--seed", str(self.train_seed)]

    def budget_s(self) -> float:
        """The longest a run may take before one of its own budgets fails it: the reference run, the
        start, every kill's wait and recovery, and the finish. A caller's own timeout (pytest's) must
        be above this, or it cuts the run off before the run can say what went wrong."""
        kills = len(self.kinds) or self.kills
        return (self.reference_timeout + self.recovery_timeout + kills * (self.max_wait + self.recovery_timeout)
                + self.finish_timeout)


@dataclass
class Kill:
    n: int
    kind: str
    node: int
    step_at_kill: int
    t: float
    pid: int | None = None
    recovery_s: float | None = None
    restart_step: int | None = None
    progress_lost: int = 0
    hang: bool = False
    note: str = ""
    rebuilds: dict[str, float] = field(default_factory=dict)  # the restarted daemon's ftd_rebuilds_total by outcome
    segments_adopted: int | None = None  # what the restarted daemon re-adopted (daemon and node kills)


@dataclass
class ChaosResult:
    options: dict[str, Any]
    kills: list[Kill] = field(default_factory=list)
    hangs: int = 0
    divergent: int = 0
    param_mismatch: list[str] = field(default_factory=list)
    missing: int = 0
    compared: int = 0
    torn_lines: int = 0
    restarts_from_0: int = 0  # rank restores that started from step 0 although their daemon held steps
    unrecoverable: int = 0  # rebuilds the replacement daemons gave up on (more than m nodes lost)
    resumes: int = 0  # rank restores that resumed a step
    rebuilt: int = 0  # rebuilds from peers the replacement daemons completed
    finished: bool = False
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    reference_s: float = 0.0
    workdir: str = ""
    lag: dict[str, Any] = field(default_factory=dict)  # protection lag figures (LagSampler.summary)
    lag_samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def recoveries(self) -> list[Kill]:
        return [k for k in self.kills if not k.hang and k.recovery_s is not None]

    @property
    def ok(self) -> bool:
        return (self.finished and not self.hangs and not self.divergent and not self.param_mismatch
                and not self.missing and not self.errors)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["recovered"] = len(self.recoveries)
        doc["ok"] = self.ok
        return doc

    def table(self) -> str:
        """The summary printed at the end of a run."""
        lines = ["=" * 64, f"chaos: {self.options['nodes']} nodes, EC {self.options['ec']}, "
                 f"{self.options['steps']} steps, seed {self.options['seed']}",
                 f"{'kind':<8} {'kills':>6} {'recovered':>10} {'median s':>9} {'max s':>8}"]
        for kind in (*KINDS, "total"):
            kills = [k for k in self.kills if kind in ("total", k.kind)]
            secs = [k.recovery_s for k in kills if not k.hang and k.recovery_s is not None]
            med = f"{statistics.median(secs):.2f}" if secs else "-"
            top = f"{max(secs):.2f}" if secs else "-"
            lines.append(f"{kind:<8} {len(kills):>6} {len(secs):>10} {med:>9} {top:>8}")
        lost = [(k.n, k.kind, k.step_at_kill, k.restart_step) for k in self.kills if k.progress_lost]
        lines += ["-" * 64,
                  f"recoveries          {len(self.recoveries)}",
                  f"hangs               {self.hangs}",
                  f"divergences         {self.divergent + len(self.param_mismatch)} ({self.divergent} (rank, step) "
                  f"losses, {len(self.param_mismatch)} parameter files)",
                  f"losses compared     {self.compared} (rank, step); {self.missing} missing; "
                  f"{self.torn_lines} torn lines",
                  f"progress lost       {len(lost)} kills went back > {self.options['lost_threshold']} steps {lost[:8]}",
                  f"restarts from 0     {self.restarts_from_0} rank restores; {self.unrecoverable} rebuilds "
                  "unrecoverable",
                  f"resumes             {self.resumes} rank restores; nodes rebuilt {self.rebuilt}",
                  f"training finished   {self.finished}",
                  f"errors              {self.errors or 'none'}",
                  f"wall time           {self.wall_s:.1f} s (reference {self.reference_s:.1f} s)",
                  *_lag_lines(self.lag),
                  "=" * 64]
        return "\n".join(lines)


def _quantiles(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"median": None, "p90": None, "max": None, "samples": 0}
    ordered = sorted(xs)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max": ordered[-1], "samples": len(ordered)}


def _lag_lines(lag: dict[str, Any]) -> list[str]:
    lines = []
    for phase in ("steady", "recovering"):
        steps, secs = lag.get(phase, {}).get("steps", {}), lag.get(phase, {}).get("seconds", {})
        if not steps or steps.get("median") is None:
            continue
        sec = "-" if secs.get("median") is None else f"{secs['median']:.2f} / {secs['p90']:.2f} / {secs['max']:.2f} s"
        lines.append(f"protection lag {phase:<10} {steps['median']:.0f} / {steps['p90']:.0f} / {steps['max']:.0f} "
                     f"steps, {sec} (median / p90 / max of {steps['samples']} samples)")
    return lines


class LagSampler:
    """Samples every node's protection lag from its daemon's metrics (a node that does not answer is skipped)."""

    def __init__(self, nodes: list[LocalNode], poll: float):
        self.nodes, self.poll = nodes, poll
        self.samples: list[dict[str, Any]] = []
        self._t0 = time.monotonic()
        self._last = 0.0

    def maybe_sample(self, phase: str) -> None:
        now = time.monotonic()
        if now - self._last < self.poll:
            return
        self._last = now
        for node in self.nodes:
            try:
                m = Metrics.scrape(int(node.env["FTD_METRICS_PORT"]), timeout=2)
            except (OSError, ValueError):  # down, restarting, or a scrape cut short
                continue
            sealed = max(m.by_label("ftd_newest_sealed_step", "rank").values(), default=-1)
            protected = m.value("ftd_newest_protected_step")
            if sealed < 0 or protected < 0:
                continue
            self.samples.append({"t": round(now - self._t0, 2), "node": node.index, "phase": phase,
                                 "sealed": int(sealed), "protected": int(protected),
                                 "lag_s": m.value("ftd_protection_lag_seconds")})

    def sleep(self, seconds: float, phase: str = "steady") -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.maybe_sample(phase)
            time.sleep(min(0.05, left))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for phase in ("steady", "recovering"):
            rows = [r for r in self.samples if r["phase"] == phase]
            out[phase] = {"steps": _quantiles([float(max(0, r["sealed"] - r["protected"])) for r in rows]),
                          "seconds": _quantiles([r["lag_s"] for r in rows if r["lag_s"] >= 0])}
        return out


def _say(msg: str) -> None:
    print(f"[{stamp()}] {msg}", flush=True)


class _Job:
    """The cluster under chaos: nodes, their agents, the store and a tail of the loss files."""

    def __init__(self, opts: ChaosOptions, root: Path):
        self.opts = opts
        self.nodes = make_nodes(root, opts.nodes, opts.ec, job="chaos")
        self.store = RendezvousStore()
        self.agents: list[Any] = []
        self.tail = LossTail([n.losses for n in self.nodes])
        self.lag = LagSampler(self.nodes, opts.lag_poll)
        self.train = [*opts.train_args(), "--step-sleep", str(opts.step_sleep)]

    def start(self) -> None:
        for node in self.nodes:
            node.start_daemon()
        self.agents = [self._agent(node) for node in self.nodes]

    def _agent(self, node: LocalNode) -> Any:
        return node.agent(self.store.port, self.opts.nodes, self.train, "chaos", self.opts.max_restarts)

    def failed_agent(self) -> str | None:
        for i, agent in enumerate(self.agents):
            if agent.poll() not in (None, 0):
                return f"agent of node {i} exited with {agent.returncode}"
        return None

    def done(self) -> bool:
        return bool(self.agents) and all(a.poll() == 0 for a in self.agents)

    def every_rank_wrote(self, lines: int, before: dict[int, int] | None = None) -> bool:
        base = before or {}
        return all(self.tail.lines_per_rank[r] - base.get(r, 0) >= lines for r in range(self.opts.nodes))

    def kill(self, kind: str, i: int, kill: Kill) -> None:
        node = self.nodes[i]
        if kind == "rank":
            workers = node.workers()
            if not workers:
                kill.note = "no worker running (between restarts): nothing killed"
            for worker in workers:
                kill.pid = worker.pid
                try:
                    worker.kill()
                except Exception:  # noqa: BLE001 - it died on its own meanwhile
                    pass
        elif kind == "daemon":
            assert node.daemon is not None and node.daemon.proc is not None
            kill.pid = node.daemon.proc.pid
            node.daemon.kill()
            node.start_daemon(attempts=5)
        else:
            kill.pid = self.agents[i].pid
            node.lose_everything()
            node.start_daemon(attempts=5)
            self.agents[i] = self._agent(node)

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # noqa: BLE001 - clean up the rest regardless
                _say(f"cleanup of node {node.index}: {exc}")
        self.store.stop()


def run_chaos(opts: ChaosOptions, say: Callable[[str], None] = _say) -> ChaosResult:
    """Run the chaos job described by `opts`; the result holds every kill and the bit-exact verdict."""
    if opts.steps <= 0:
        opts.steps = 80 * opts.kills + 300
    if opts.seed is None:
        opts.seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(opts.seed)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="ftd-chaos-"))
    result = ChaosResult(options={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
                         workdir=str(work))
    say(f"chaos: {opts.kills} kills, {opts.nodes} nodes, EC {opts.ec}, {opts.steps} steps, "
        f"step-sleep {opts.step_sleep}, seed {opts.seed}, files in {work}")
    t_start = time.monotonic()
    say("reference run (no ftd, no failures) ...")
    # step-sleep only sleeps; it cannot change a bit, so the reference runs without it
    reference = reference_run(work / "reference", opts.nodes, opts.train_args(), opts.reference_timeout)
    result.reference_s = round(time.monotonic() - t_start, 1)
    say(f"reference done in {result.reference_s} s")

    job = _Job(opts, work / "cluster")
    tail = job.tail
    t_chaos = time.monotonic()
    try:
        job.start()
        _wait(lambda: job.every_rank_wrote(opts.recovery_lines), job, opts.recovery_timeout, "training did not start",
              phase="start")
        say(f"training running (step {tail.max_step}) after {time.monotonic() - t_chaos:.1f} s")
        for n in range(1, opts.kills + 1):
            job.lag.sleep(rng.uniform(opts.min_wait, opts.max_wait))
            tail.poll()
            if job.done() or tail.frontier() >= opts.steps - 10:
                say(f"training (nearly) finished at step {tail.max_step}; stopping after {n - 1} kills")
                break
            kind = opts.kinds[(n - 1) % len(opts.kinds)] if opts.kinds else rng.choices(KINDS, opts.weights)[0]
            i = rng.randrange(opts.nodes)
            kill = Kill(n, kind, i, tail.mark(), round(time.monotonic() - t_chaos, 2))
            before = dict(tail.lines_per_rank)
            t_kill = time.monotonic()
            job.kill(kind, i, kill)
            say(f"kill {n}/{opts.kills}: {kind} on node {i} (pid {kill.pid}) at step {kill.step_at_kill}")
            recovered = _wait(lambda: job.every_rank_wrote(opts.recovery_lines, before) or job.done(), job,
                              opts.recovery_timeout, None)
            kill.recovery_s = round(time.monotonic() - t_kill, 2)
            kill.restart_step = tail.min_since_mark
            if kill.restart_step is not None and kill.step_at_kill - kill.restart_step > opts.lost_threshold:
                kill.progress_lost = kill.step_at_kill - kill.restart_step
                say(f"  PROGRESS LOST: the group went back from step {kill.step_at_kill} to {kill.restart_step}")
            result.kills.append(kill)
            if not recovered:
                kill.hang = True
                result.hangs += 1
                say(f"  HANG: no recovery within {opts.recovery_timeout} s")
                break
            if kind != "rank":
                _daemon_facts(job.nodes[i], kill)
            say(f"  recovered in {kill.recovery_s:.2f} s (restarted at step {kill.restart_step}, "
                f"now {tail.frontier()})")
            tail.mark()  # the next kill's frontier counts only steps written after this recovery
        if not result.hangs:
            say("chaos over; letting training finish ...")
            if _wait(job.done, job, opts.finish_timeout, None, phase="steady"):
                result.finished = True
                say("training finished")
            else:
                result.hangs += 1
                say(f"HANG: training did not finish within {opts.finish_timeout} s (step {tail.max_step})")
    except FtdError as exc:
        result.errors.append(str(exc))
        say(f"ERROR: {exc}")
    finally:
        job.close()
    result.lag, result.lag_samples = job.lag.summary(), job.lag.samples

    tail.poll()
    got = all_losses([n.losses for n in job.nodes])
    params = sorted((work / "cluster").glob("node*/params-*.pt")) if result.finished else []
    verdict = compare(reference, got, params)
    result.divergent, result.compared, result.torn_lines = len(verdict.divergent), verdict.compared, tail.torn_lines
    result.param_mismatch = verdict.param_mismatch + ([] if params or not result.finished else ["no parameter files"])
    result.missing = len(verdict.missing) if result.finished else 0
    for key in verdict.divergent[:10]:
        say(f"DIVERGENCE rank {key[0]} step {key[1]}: got {sorted(got[key])} want "
            f"{sorted(reference.losses.get(key, []))}")
    records = [r for n in job.nodes for r in n.results()]
    result.resumes = len(results.resumed(records))
    result.restarts_from_0 = len(results.restarted_from_0(records))
    result.unrecoverable = int(sum(k.rebuilds.get("unrecoverable", 0) for k in result.kills))
    result.rebuilt = int(sum(k.rebuilds.get("rebuilt", 0) for k in result.kills))
    result.wall_s = round(time.monotonic() - t_start, 1)
    return result


def _daemon_facts(node: LocalNode, kill: Kill) -> None:
    """After a recovery: the restarted daemon's rebuild outcomes and re-adopted segments (its metrics)."""
    try:
        scrape = node.metrics()
    except OSError as exc:
        kill.note = f"metrics of node {node.index} unreadable: {exc}"
        return
    kill.rebuilds = scrape.by_label("ftd_rebuilds_total", "outcome")
    kill.segments_adopted = int(scrape.value("ftd_segments_adopted_total"))


def _wait(ready: Callable[[], bool], job: _Job, timeout: float, error: str | None,
          phase: str = "recovering") -> bool:
    """Poll until `ready()`, sampling the lag as `phase`; False on timeout (FtdError with `error` if given).
    FtdError if an agent fails."""
    deadline = time.monotonic() + timeout
    while True:
        job.tail.poll()
        job.lag.maybe_sample(phase)
        if ready():
            return True
        if (failed := job.failed_agent()) is not None:
            raise FtdError(failed)
        if time.monotonic() > deadline:
            if error:
                raise FtdError(error)
            return False
        time.sleep(0.05)
