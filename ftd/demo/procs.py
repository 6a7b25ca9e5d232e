"""Daemons and trainers as real processes on this machine, for `ftd demo` and the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ftd.client.rpc import DaemonClient
from ftd.errors import FtdError


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65534:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def ftd_env(workdir: Path, job: str, **extra: str) -> dict[str, str]:
    """An environment in which a daemon and its trainers agree on job, socket and shm directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTD_")}
    env.update(FTD_JOB=job, FTD_SOCKET=str(workdir / "ftd.sock"), FTD_SHM_DIR=str(workdir / "shm"),
               FTD_MEMORY_RESERVE="0", FTD_RPC_TIMEOUT="5", FTD_METRICS_PORT="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class DaemonProcess:
    """`ftd daemon` in its own process; `start()` returns once it answers on its socket."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ftd", "daemon"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = DaemonClient(self.env["FTD_SOCKET"], self.env["FTD_JOB"], 0, timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise FtdError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    client.status()
                    return self
                except FtdError:
                    if time.monotonic() > deadline:
                        raise FtdError(f"daemon did not answer within {timeout} s; see {self.log_path}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def start_trainer(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m ftd.demo.train ARGS` in its own process, output appended to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "ftd.demo.train", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def read_losses(path: Path, rank: int = 0) -> dict[int, str]:
    """The last recorded loss of each step (a resumed run rewrites the steps it repeats)."""
    losses: dict[int, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:  # a line cut short by SIGKILL
                continue
            if doc.get("rank", 0) == rank:
                losses[doc["step"]] = doc["loss"]
    return losses


def wait_for_step(path: Path, step: int, proc: subprocess.Popen[bytes], timeout: float, rank: int = 0) -> None:
    """Wait until the trainer has recorded `step` (FtdError if it exits or the time runs out)."""
    deadline = time.monotonic() + timeout
    while max(read_losses(path, rank), default=-1) < step:
        if proc.poll() is not None:
            raise FtdError(f"trainer exited with {proc.returncode} before step {step}")
        if time.monotonic() > deadline:
            raise FtdError(f"trainer did not reach step {step} within {timeout} s")
        time.sleep(0.01)
