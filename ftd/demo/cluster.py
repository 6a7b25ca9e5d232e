"""A local cluster of simulated nodes on loopback, for `ftd demo`, the chaos run, benches and tests.

Each node is a work directory with its own shm directory, socket and peer ports, an `ftd daemon`
and (optionally) a torchrun agent. The rendezvous store lives outside the nodes, as DISTRIBUTED.md
requires: a lost node must not take the job's store with it.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ftd.client.rpc import DaemonClient
from ftd.demo import results
from ftd.demo.bitexact import differing
from ftd.demo.procs import DaemonProcess, free_port, free_port_pair, ftd_env, read_losses, start_trainer
from ftd.errors import FtdError

TRAIN_MODULE = "ftd.demo.train"
Losses = dict[tuple[int, int], set[str]]


@dataclass
class LocalNode:
    """One simulated node: its files, its daemon, its agent or trainers.

    Trainers started here write their losses, final parameters and results records
    (ftd.demo.results) into the node's directory; `results()` reads the records back.
    """

    index: int
    root: Path
    env: dict[str, str]
    daemon: DaemonProcess | None = None
    trainers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def shm(self) -> Path:
        return Path(self.env["FTD_SHM_DIR"])

    @property
    def losses(self) -> Path:
        return self.root / "losses.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def daemon_log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def results_path(self) -> str:
        """The `--results` argument of this node's trainers (one file per rank)."""
        return str(self.root / "results-{rank}.jsonl")

    def file_args(self) -> list[str]:
        """The demo trainer's arguments that put its losses, parameters and results in this node's files."""
        return ["--losses", str(self.losses), "--out", str(self.root / "params-{rank}.pt"),
                "--results", self.results_path]

    def results(self) -> list[results.Record]:
        """Every results record the trainers of this node wrote (see ftd.demo.results)."""
        return results.read(sorted(self.root.glob("results-*.jsonl")))

    def params(self, rank: int = 0) -> dict[str, Any]:
        """The final parameters the trainer of `rank` saved on this node."""
        import torch

        return torch.load(self.root / f"params-{rank}.pt", weights_only=True)

    def sealed_manifests(self, rank: int = 0) -> dict[int, Path]:
        """Step -> manifest file of every sealed snapshot of `rank` in this node's shm directory."""
        return {json.loads(p.read_bytes())["step"]: p for p in self.shm.glob(f"ftd-*/rank-{rank}/*.manifest.json")}

    def start_daemon(self, attempts: int = 1) -> DaemonProcess:
        """Start the node's daemon (retrying `attempts` times: a killed one may still hold its ports)."""
        for _ in range(attempts - 1):
            try:
                self.daemon = DaemonProcess(self.env, self.daemon_log).start()
                return self.daemon
            except FtdError:
                time.sleep(1.0)
        self.daemon = DaemonProcess(self.env, self.daemon_log).start()
        return self.daemon

    def status(self) -> Any:
        """The daemon's `Status` reply (ranks with sealed_steps, protected_step, rebuilding, peers)."""
        client = DaemonClient(self.env["FTD_SOCKET"], self.env["FTD_JOB"], 0, timeout=5)
        try:
            return client.status()
        finally:
            client.close()

    def metrics(self) -> Metrics:
        """A scrape of the daemon's Prometheus endpoint (FTD_METRICS_PORT must be set)."""
        return Metrics.scrape(int(self.env["FTD_METRICS_PORT"]))

    def trainer(self, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        """A demo trainer process of this node (outside torchrun), writing the node's files."""
        proc = start_trainer([*args, *self.file_args()], dict(self.env, **env), self.log)
        self.trainers.append(proc)
        return proc

    def run_trainer(self, args: list[str], timeout: float = 180, **env: str) -> None:
        """Run a demo trainer to its end; FtdError when it fails."""
        proc = self.trainer(args, **env)
        if proc.wait(timeout) != 0:
            raise FtdError(f"trainer exited with {proc.returncode}:\n" + self.log.read_text()[-4000:])

    def torchrun(self, nproc: int, train_args: list[str], program: list[str] | None = None,
                 max_restarts: int = 2, **env: str) -> subprocess.Popen[bytes]:
        """A standalone torchrun of `nproc` demo trainers (or `program` with `train_args` as they are)."""
        worker = ["-m", TRAIN_MODULE, *train_args, *self.file_args()] if program is None else [*program, *train_args]
        proc = torchrun(worker, dict(self.env, **env), self.log, nproc, max_restarts)
        self.trainers.append(proc)
        return proc

    def agent(self, store_port: int, nnodes: int | str, train_args: list[str], rdzv_id: str = "ftd",
              max_restarts: int = 100, program: list[str] | None = None,
              rdzv_conf: str = "") -> subprocess.Popen[bytes]:
        """A torchrun agent (elastic, c10d rendezvous on the external store) running one worker.

        The worker is the demo trainer (with this node's files), or `program` (e.g. [script.py])
        with `train_args`, `--losses` and `--results` of this node. `nnodes` may be a range
        ("3:4"); `rdzv_conf` adds rendezvous settings (e.g. "last_call_timeout=2").
        """
        if program is None:
            worker = ["-m", TRAIN_MODULE, *train_args, *self.file_args()]
        else:
            worker = [*program, *train_args, "--losses", str(self.losses), "--results", self.results_path]
        rendezvous = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{store_port}",
                      f"--rdzv-id={rdzv_id}",
                      "--rdzv-conf=is_host=0,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300"
                      + (f",{rdzv_conf}" if rdzv_conf else ""),
                      "--monitor-interval=0.5"]
        proc = torchrun(worker, self.env, self.log, 1, max_restarts, rendezvous)
        self.trainers.append(proc)
        return proc

    def worker_ranks(self) -> list[int]:
        """The RANK of each worker running on this node now."""
        ranks = []
        for worker in self.workers():
            try:
                ranks.append(int(worker.environ()["RANK"]))
            except (psutil.Error, KeyError, ValueError):
                pass
        return ranks

    def worker_of_rank(self, rank: int) -> psutil.Process:
        """The training process of `rank` running under this node's agents (FtdError when there is none)."""
        for worker in self.workers():
            try:
                if worker.environ().get("RANK") == str(rank):
                    return worker
            except psutil.Error:
                continue
        raise FtdError(f"no worker of rank {rank} runs on node {self.index}")

    def workers(self) -> list[psutil.Process]:
        """The training processes running under this node's agents right now."""
        found = []
        for proc in self.trainers:
            if proc.poll() is not None:
                continue
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for kid in kids:
                try:
                    if "RANK" in kid.environ() and "torch.distributed.run" not in " ".join(kid.cmdline()):
                        found.append(kid)
                except psutil.Error:
                    pass
        return found

    def lose_everything(self) -> None:
        """SIGKILL every process of the node (agents with their workers, the daemon) and wipe its memory."""
        for proc in self.trainers:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(30)
        if self.daemon is not None:
            self.daemon.kill()
        shutil.rmtree(self.shm, ignore_errors=True)

    close = lose_everything


class Metrics:
    """One scrape of a daemon's Prometheus endpoint: `value(name, **labels)` sums the matching samples."""

    def __init__(self, samples: list[tuple[str, dict[str, str], float]]):
        self.samples = samples

    @classmethod
    def scrape(cls, port: int, timeout: float = 10) -> Metrics:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
            text = reply.read().decode()
        return cls([(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text)
                    for s in f.samples])

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0.0 when none)."""
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == w for k, w in labels.items()))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """label value -> sample value, for the samples called `name`."""
        return {lab[label]: v for n, lab, v in self.samples if n == name and label in lab}


def torchrun(worker: list[str], env: dict[str, str], log: Path, nproc: int = 1, max_restarts: int = 2,
             rendezvous: list[str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m torch.distributed.run` of `worker` (arguments after the launcher's), output appended to `log`.

    Without `rendezvous` (torchrun's --nnodes/--rdzv-* flags) it runs --standalone.
    """
    env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", *(rendezvous or ["--standalone"]),
           f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", *worker]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def shm_root(fallback: Path) -> Path:
    """Where simulated nodes put their shm directories: /dev/shm when it exists."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else fallback


def single_node(root: Path, job: str, **env: str) -> LocalNode:
    """A node without peers: its own socket, shm directory (fresh, under /dev/shm) and metrics port."""
    root.mkdir(parents=True, exist_ok=True)
    shm = shm_root(root) / f"ftd-{job}-{uuid.uuid4().hex[:12]}"
    settings = dict(FTD_SHM_DIR=str(shm), FTD_LOG_LEVEL="INFO", FTD_METRICS_PORT=str(free_port()),
                    FTD_METRICS_ADDRESS="127.0.0.1")
    return LocalNode(0, root, ftd_env(root, job, **dict(settings, **env)))


def make_nodes(root: Path, count: int, ec: str, host: str = "127.0.0.1", job: str = "ectest",
               token: str | None = None, **env: str) -> list[LocalNode]:
    """`count` nodes protecting each other with `ec` ("k+m"); `host` may be a DNS name like "localhost"."""
    ports = [free_port_pair() for _ in range(count)]
    metrics_ports: list[int] = []
    while len(metrics_ports) < count:
        port = free_port()
        if port not in metrics_ports and not any(port in (p, p + 1) for p in ports):
            metrics_ports.append(port)
    tag = uuid.uuid4().hex[:8]  # shm paths are global: never share one with another run
    peers = ",".join(f"{host}:{p}" for p in ports)
    shm = shm_root(root)
    settings = dict(FTD_PEERS=peers, FTD_EC=ec, FTD_CLUSTER_TOKEN=token or secrets.token_hex(16),
                    FTD_HEARTBEAT_INTERVAL="0.2", FTD_PEER_TIMEOUT="2", FTD_REBUILD_WAIT="20", FTD_LOG_LEVEL="INFO")
    settings.update(env)
    nodes = []
    for i in range(count):
        node_root = root / f"node{i}"
        node_root.mkdir(parents=True)
        node_env = ftd_env(node_root, job, **{"FTD_SHM_DIR": str(shm / f"ftd-{tag}-n{i}"), "FTD_NODE": str(i),
                                              "FTD_METRICS_PORT": str(metrics_ports[i]),
                                              "FTD_METRICS_ADDRESS": "127.0.0.1", **settings})
        nodes.append(LocalNode(i, node_root, node_env))
    return nodes


def protected_steps(nodes: list[LocalNode]) -> list[int]:
    """Each node's protected step (-1 for a node that does not answer)."""
    steps = []
    for node in nodes:
        try:
            steps.append(node.status().protected_step)  # type: ignore[attr-defined]
        except FtdError:
            steps.append(-1)
    return steps


def wait_protected(nodes: list[LocalNode], step: int, timeout: float = 120, poll: float = 0.1) -> int:
    """Wait until every node reports a protected step >= `step` (asking every `poll` s); return the smallest."""
    deadline = time.monotonic() + timeout
    while True:
        steps = protected_steps(nodes)
        if min(steps) >= step:
            return min(steps)
        if time.monotonic() > deadline:
            raise FtdError(f"protected steps {steps} did not reach {step} within {timeout} s")
        time.sleep(poll)


class RendezvousStore:
    """The c10d rendezvous store in a process of its own, off every simulated node."""

    def __init__(self, timeout_s: int = 300, start_timeout: float = 60.0):
        """Start the store and return once it accepts connections: a port picked free can be taken by
        someone else before the store binds it (then the store exits, and another port is tried)."""
        deadline = time.monotonic() + start_timeout
        while True:
            self.port = free_port()
            code = ("import torch.distributed as d, datetime, time; "
                    f"s = d.TCPStore('127.0.0.1', {self.port}, is_master=True, multi_tenant=True, "
                    f"wait_for_workers=False, timeout=datetime.timedelta(seconds={timeout_s})); time.sleep(1e9)")
            self.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                         stderr=subprocess.DEVNULL)
            while self.proc.poll() is None and time.monotonic() < deadline:
                with socket.socket() as probe:
                    listening = probe.connect_ex(("127.0.0.1", self.port)) == 0
                time.sleep(0.05)
                if listening and self.proc.poll() is None:  # ours, not another process's, that listens
                    return
            self.stop()
            if time.monotonic() >= deadline:
                raise FtdError(f"the rendezvous store did not start within {start_timeout:.0f} s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


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


class LossTail:
    """Follows every node's loss file: each (rank, step)'s recorded losses and per-rank line counts.

    `mark()` starts an interval; `min_since_mark` is where the group (re)started from in it and
    `frontier()` the highest step written in it (or before it, when nothing is yet).
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._offsets = {p: 0 for p in paths}
        self._partial = {p: b"" for p in paths}
        self.seen: Losses = defaultdict(set)
        self.lines_per_rank: Counter[int] = Counter()
        self.max_step = -1
        self.torn_lines = 0
        self.min_since_mark: int | None = None
        self.max_since_mark: int | None = None
        self._front = -1

    def frontier(self) -> int:
        return self._front if self.max_since_mark is None else self.max_since_mark

    def mark(self) -> int:
        """Start a new interval; return the frontier of the one that ended."""
        self.poll()
        self._front = self.frontier()
        self.min_since_mark = self.max_since_mark = None
        return self._front

    def poll(self) -> None:
        for path in self.paths:
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self._offsets[path])
                data = f.read()
            if not data:
                continue
            self._offsets[path] += len(data)
            *lines, self._partial[path] = (self._partial[path] + data).split(b"\n")
            for line in lines:
                try:
                    doc = json.loads(line)
                except ValueError:  # a line cut short by SIGKILL
                    self.torn_lines += 1
                    continue
                step = doc["step"]
                self.seen[(doc["rank"], step)].add(doc["loss"])
                self.lines_per_rank[doc["rank"]] += 1
                self.max_step = max(self.max_step, step)
                self.min_since_mark = step if self.min_since_mark is None else min(self.min_since_mark, step)
                self.max_since_mark = step if self.max_since_mark is None else max(self.max_since_mark, step)


def all_losses(paths: list[Path]) -> Losses:
    """(rank, step) -> every loss recorded for it in these files (across restarts: all must agree)."""
    tail = LossTail(paths)
    tail.poll()
    return tail.seen


class Reference:
    """The same job without ftd and without failures: `world` plain gloo ranks started directly.

    `start()` launches them and returns at once (a test can run its own job beside them);
    `wait()` waits for them to finish. Rank r writes losses-r.jsonl and params-r.pt in `root`.
    """

    def __init__(self, root: Path, world: int, train_args: list[str]):
        self.root, self.world, self.train_args = root, world, train_args
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Reference:
        self.root.mkdir(parents=True, exist_ok=True)
        env = ftd_env(self.root, "reference", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      WORLD_SIZE=str(self.world))
        for rank in range(self.world):
            self.procs.append(start_trainer([*self.train_args, "--no-ftd", "--losses", str(self.losses_file(rank)),
                                             "--out", str(self.params_file(rank))],
                                            dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), self.root / "train.log"))
        return self

    def wait(self, timeout: float = 1800) -> Reference:
        """Wait for every rank; FtdError (the ranks killed) when one fails or the time runs out."""
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                if proc.wait(max(deadline - time.monotonic(), 0.1)) != 0:
                    raise FtdError("reference run failed:\n" + (self.root / "train.log").read_text()[-3000:])
        except subprocess.TimeoutExpired:
            raise FtdError(f"the reference run did not finish within {timeout:.0f} s") from None
        finally:
            self.kill()
        return self

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(30)

    def losses_file(self, rank: int) -> Path:
        return self.root / f"losses-{rank}.jsonl"

    def params_file(self, rank: int) -> Path:
        return self.root / f"params-{rank}.pt"

    @property
    def losses(self) -> Losses:
        """(rank, step) -> its loss (a one-element set, as all_losses gives)."""
        return all_losses([self.losses_file(r) for r in range(self.world)])

    def rank_losses(self, rank: int = 0) -> dict[int, str]:
        """step -> loss of one rank."""
        return read_losses(self.losses_file(rank), rank)

    def params(self, rank: int = 0) -> dict[str, Any]:
        import torch

        return torch.load(self.params_file(rank), weights_only=True)


def reference_run(root: Path, world: int, train_args: list[str], timeout: float = 1800) -> Reference:
    """Run the reference (see Reference) to its end."""
    return Reference(root, world, train_args).start().wait(timeout)


@dataclass
class Comparison:
    """How a run's losses and final parameters compare with the reference's, bit for bit."""

    compared: int
    divergent: list[tuple[int, int]]
    missing: list[tuple[int, int]]
    param_files: int
    param_mismatch: list[str]

    @property
    def bit_exact(self) -> bool:
        return not (self.divergent or self.missing or self.param_mismatch) and self.param_files > 0


def compare(reference: Reference, got: Losses, param_files: list[Path]) -> Comparison:
    """Every recorded (rank, step) loss and every final parameter file (params-<rank>.pt) against the reference."""
    import torch

    want_losses = reference.losses
    divergent = sorted(k for k in got if got[k] != want_losses.get(k))
    missing = sorted(set(want_losses) - set(got))
    mismatch = []
    for path in param_files:
        rank = int(path.stem.rsplit("-", 1)[1])
        if differing(torch.load(path, weights_only=True), reference.params(rank)):
            mismatch.append(str(path))
    return Comparison(len(got), divergent, missing, len(param_files), mismatch)


def stamp() -> str:
    """Wall-clock time for progress lines."""
    return datetime.datetime.now().strftime("%H:%M:%S")
