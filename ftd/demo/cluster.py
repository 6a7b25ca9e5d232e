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
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ftd.client.rpc import DaemonClient
from ftd.demo.procs import DaemonProcess, free_port, free_port_pair, ftd_env, start_trainer
from ftd.errors import FtdError

TRAIN_MODULE = "ftd.demo.train"
Losses = dict[tuple[int, int], set[str]]


@dataclass
class LocalNode:
    """One simulated node: its files, its daemon, its agent or trainers."""

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

    def status(self) -> object:
        client = DaemonClient(self.env["FTD_SOCKET"], self.env["FTD_JOB"], 0, timeout=5)
        try:
            return client.status()
        finally:
            client.close()

    def trainer(self, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        """A trainer process of this node (outside torchrun), writing the node's loss and params files."""
        proc = start_trainer([*args, "--losses", str(self.losses), "--out", str(self.root / "params-{rank}.pt")],
                             dict(self.env, **env), self.log)
        self.trainers.append(proc)
        return proc

    def agent(self, store_port: int, nnodes: int, train_args: list[str], rdzv_id: str = "ftd",
              max_restarts: int = 100, program: list[str] | None = None) -> subprocess.Popen[bytes]:
        """A torchrun agent (elastic, c10d rendezvous on the external store) running one worker.

        The worker is the demo trainer (with this node's loss and params files), or `program`
        (e.g. [script.py]) with `train_args` and `--losses <node's loss file>`.
        """
        env = dict(self.env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
        if program is None:
            worker = ["-m", TRAIN_MODULE, *train_args, "--losses", str(self.losses),
                      "--out", str(self.root / "params-{rank}.pt")]
        else:
            worker = [*program, *train_args, "--losses", str(self.losses)]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{store_port}", f"--rdzv-id={rdzv_id}",
               f"--max-restarts={max_restarts}",
               "--rdzv-conf=is_host=0,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300",
               "--monitor-interval=0.5", *worker]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def make_nodes(root: Path, count: int, ec: str, host: str = "127.0.0.1", job: str = "ectest",
               token: str | None = None, **env: str) -> list[LocalNode]:
    """`count` nodes protecting each other with `ec` ("k+m"); `host` may be a DNS name like "localhost"."""
    ports = [free_port_pair() for _ in range(count)]
    tag = uuid.uuid4().hex[:8]  # shm paths are global: never share one with another run
    peers = ",".join(f"{host}:{p}" for p in ports)
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else root
    settings = dict(FTD_PEERS=peers, FTD_EC=ec, FTD_CLUSTER_TOKEN=token or secrets.token_hex(16),
                    FTD_HEARTBEAT_INTERVAL="0.2", FTD_PEER_TIMEOUT="2", FTD_REBUILD_WAIT="20", FTD_LOG_LEVEL="INFO")
    settings.update(env)
    nodes = []
    for i in range(count):
        node_root = root / f"node{i}"
        node_root.mkdir(parents=True)
        node_env = ftd_env(node_root, job, FTD_SHM_DIR=str(shm_root / f"ftd-{tag}-n{i}"), FTD_NODE=str(i), **settings)
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


def wait_protected(nodes: list[LocalNode], step: int, timeout: float = 120) -> int:
    """Wait until every node reports a protected step >= `step`; return the smallest reported."""
    deadline = time.monotonic() + timeout
    while True:
        steps = protected_steps(nodes)
        if min(steps) >= step:
            return min(steps)
        if time.monotonic() > deadline:
            raise FtdError(f"protected steps {steps} did not reach {step} within {timeout} s")
        time.sleep(0.1)


class RendezvousStore:
    """The c10d rendezvous store in a process of its own, off every simulated node."""

    def __init__(self, timeout_s: int = 300):
        self.port = free_port()
        code = ("import torch.distributed as d, datetime, time; "
                f"s = d.TCPStore('127.0.0.1', {self.port}, is_master=True, multi_tenant=True, "
                f"wait_for_workers=False, timeout=datetime.timedelta(seconds={timeout_s})); time.sleep(1e9)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)

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


def reference_run(root: Path, world: int, train_args: list[str], timeout: float = 1800) -> tuple[Losses, Path]:
    """The same job without ftd and without failures: `world` plain gloo ranks. Returns losses and params file."""
    root.mkdir(parents=True)
    master = free_port()
    procs = []
    for rank in range(world):
        env = dict(ftd_env(root, "reference"), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
        procs.append(start_trainer([*train_args, "--no-ftd", "--losses", str(root / f"losses-{rank}.jsonl"),
                                    "--out", str(root / "params-{rank}.pt")], env, root / "train.log"))
    try:
        for proc in procs:
            if proc.wait(timeout) != 0:
                raise FtdError("reference run failed:\n" + (root / "train.log").read_text()[-3000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
    return all_losses([root / f"losses-{r}.jsonl" for r in range(world)]), root / "params-0.pt"


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


def compare(reference: Losses, got: Losses, reference_params: Path, param_files: list[Path]) -> Comparison:
    """Every recorded (rank, step) loss and every final parameter file against the reference."""
    import torch

    divergent = sorted(k for k in got if got[k] != reference.get(k))
    missing = sorted(set(reference) - set(got))
    want = torch.load(reference_params, weights_only=True)
    mismatch = []
    for path in param_files:
        params = torch.load(path, weights_only=True)
        if params.keys() != want.keys() or not all(torch.equal(params[k], v) for k, v in want.items()):
            mismatch.append(str(path))
    return Comparison(len(got), divergent, missing, len(param_files), mismatch)


def stamp() -> str:
    """Wall-clock time for progress lines."""
    return datetime.datetime.now().strftime("%H:%M:%S")
