"""Several simulated nodes on loopback: each a daemon with its own shm directory, socket and peer ports."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ftd.client.rpc import DaemonClient
from ftd.demo.procs import DaemonProcess, free_port, free_port_pair, ftd_env, start_trainer
from ftd.errors import FtdError

TOKEN = "test-cluster-token-5f2c9a"


@dataclass
class Node:
    """One simulated node."""

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

    def start_daemon(self) -> DaemonProcess:
        self.daemon = DaemonProcess(self.env, self.daemon_log).start()
        return self.daemon

    def status(self) -> object:
        client = DaemonClient(self.env["FTD_SOCKET"], self.env["FTD_JOB"], 0, timeout=5)
        try:
            return client.status()
        finally:
            client.close()

    def trainer(self, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        proc = start_trainer([*args, "--losses", str(self.losses), "--out", str(self.root / "params-{rank}.pt")],
                             dict(self.env, **env), self.log)
        self.trainers.append(proc)
        return proc

    def lose_everything(self) -> None:
        """SIGKILL the daemon and the trainers, and wipe the node's memory (its shm directory)."""
        for proc in self.trainers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if self.daemon is not None:
            self.daemon.kill()
        shutil.rmtree(self.shm, ignore_errors=True)

    def close(self) -> None:
        for proc in self.trainers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if self.daemon is not None:
            self.daemon.kill()
        shutil.rmtree(self.shm, ignore_errors=True)


def make_nodes(tmp_path: Path, count: int, ec: str, host: str = "127.0.0.1", **env: str) -> list[Node]:
    """`count` nodes whose peer list names `host` (a DNS name such as "localhost" works like an address)."""
    ports = [free_port_pair() for _ in range(count)]
    tag = uuid.uuid4().hex[:8]  # shm paths are global: never share one with another run
    peers = ",".join(f"{host}:{p}" for p in ports)
    nodes = []
    for i in range(count):
        root = tmp_path / f"node{i}"
        root.mkdir()
        shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else root
        node_env = ftd_env(root, "ectest", FTD_SHM_DIR=str(shm_root / f"ftd-test-{tag}-n{i}"),
                           FTD_NODE=str(i), FTD_PEERS=peers, FTD_EC=ec, FTD_CLUSTER_TOKEN=TOKEN,
                           FTD_HEARTBEAT_INTERVAL="0.2", FTD_PEER_TIMEOUT="2", FTD_REBUILD_WAIT="20",
                           FTD_LOG_LEVEL="INFO", **env)
        nodes.append(Node(i, root, node_env))
    return nodes


def wait_protected(nodes: list[Node], step: int, timeout: float = 120) -> int:
    """Wait until every live node reports a protected step >= `step`; return the smallest reported."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            steps = [n.status().protected_step for n in nodes]
        except FtdError:
            steps = [-1]
        if min(steps) >= step:
            return min(steps)
        if time.monotonic() > deadline:
            raise AssertionError(f"protected steps {steps} did not reach {step} within {timeout} s")
        time.sleep(0.1)
