"""Helpers for integration tests: real daemons and trainers as separate processes on this machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ftd.demo.procs import DaemonProcess, ftd_env, read_losses, start_trainer
from tests.bitexact import differing

STEPS = 24
TRAIN_ARGS = ["--steps", str(STEPS)]


@dataclass
class Cluster:
    """One simulated node: a work directory, its environment, its daemon and its trainers' files."""

    root: Path
    env: dict[str, str]
    daemon: DaemonProcess | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def losses(self) -> Path:
        return self.root / "losses.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def shm(self) -> Path:
        return Path(self.env["FTD_SHM_DIR"])

    def start_daemon(self) -> DaemonProcess:
        self.daemon = DaemonProcess(self.env, self.root / "daemon.log").start()
        return self.daemon

    def trainer(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        args = [*TRAIN_ARGS, "--losses", str(self.losses), "--out", str(self.root / "params-{rank}.pt"), *extra]
        proc = start_trainer(args, env or self.env, self.log)
        self.procs.append(proc)
        return proc

    def run_trainer(self, *extra: str, timeout: float = 180) -> None:
        proc = self.trainer(*extra)
        assert proc.wait(timeout) == 0, self.log.read_text()[-4000:]

    def params(self, rank: int = 0) -> dict[str, torch.Tensor]:
        return torch.load(self.root / f"params-{rank}.pt", weights_only=True)

    def sealed_manifests(self) -> dict[int, Path]:
        """Step -> manifest file of every sealed snapshot of rank 0 on disk."""
        found = {}
        for path in self.shm.glob("ftd-*/rank-0/*.manifest.json"):
            found[json.loads(path.read_bytes())["step"]] = path
        return found

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if self.daemon is not None:
            self.daemon.kill()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Cluster]:
    """A node with its own shm directory (under /dev/shm when it exists) and a running daemon."""
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    shm = shm_root / f"ftd-test-{uuid.uuid4().hex[:12]}"
    cluster = Cluster(tmp_path, ftd_env(tmp_path, "itest", FTD_SHM_DIR=str(shm), FTD_LOG_LEVEL="INFO"))
    cluster.start_daemon()
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, str], dict[str, torch.Tensor]]:
    """Losses and final parameters of an uninterrupted single-process run without ftd."""
    root = tmp_path_factory.mktemp("reference")
    env = ftd_env(root, "reference")
    proc = start_trainer([*TRAIN_ARGS, "--no-ftd", "--losses", str(root / "l.jsonl"), "--out", str(root / "p.pt")],
                         env, root / "train.log")
    assert proc.wait(180) == 0, (root / "train.log").read_text()[-4000:]
    return read_losses(root / "l.jsonl"), torch.load(root / "p.pt", weights_only=True)


def assert_bit_exact(node: Cluster, reference: tuple[dict[int, str], dict[str, torch.Tensor]], rank: int = 0) -> None:
    """Every step's loss and every final parameter equal the reference, bit for bit."""
    ref_losses, ref_params = reference
    losses = read_losses(node.losses, rank)
    assert sorted(losses) == sorted(ref_losses)
    diverged = [s for s in ref_losses if losses[s] != ref_losses[s]]
    assert not diverged, f"losses differ from step {diverged[0]}: {losses[diverged[0]]} vs {ref_losses[diverged[0]]}"
    params = node.params(rank)
    assert not differing(params, ref_params), f"rank {rank}: {differing(params, ref_params)} differ"


def python() -> str:
    return sys.executable
