"""Runs of one job on one node, `ftd ls` and `ftd rm`, with a real daemon, real trainers and real files.

A new launch (another run identity) never resumes the previous run's snapshots, the same run
does, and the operator sees and discards what a node holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.client.rpc import DaemonClient
from ftd.demo.procs import DaemonProcess, ftd_env, start_trainer

JOB = "runs"


def _train(env: dict[str, str], tmp_path: Path, name: str, steps: int, run: str) -> list[int]:
    """Train to `steps` as run `run` (torchrun's run id variable); the steps this launch trained."""
    losses = tmp_path / f"{name}.jsonl"
    proc = start_trainer(["--steps", str(steps), "--dim", "16", "--layers", "1", "--losses", str(losses)],
                         dict(env, TORCHELASTIC_RUN_ID=run), tmp_path / f"{name}.log")
    assert proc.wait(60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return [json.loads(line)["step"] for line in losses.read_text().splitlines()]


def _held(env: dict[str, str]) -> list[int]:
    client = DaemonClient(env["FTD_SOCKET"], JOB, 0, timeout=5)
    try:
        return [s for r in client.status().ranks if r.rank == 0 for s in r.sealed_steps]
    finally:
        client.close()


def _ftd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ftd", *args], env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def daemon(tmp_path: Path):
    env = ftd_env(tmp_path, JOB, FTD_KEEP="2", FTD_DAEMON_WAIT="5")
    proc = DaemonProcess(env, tmp_path / "daemon.log").start()
    yield env, proc
    proc.kill()


def test_a_new_run_starts_fresh_the_same_run_resumes_and_the_old_run_is_evicted_first(tmp_path, daemon):
    env, _ = daemon
    assert _train(env, tmp_path, "a1", 6, "run-a") == list(range(6))
    assert _train(env, tmp_path, "a2", 9, "run-a") == [6, 7, 8], "the same run continues where it stopped"
    assert _held(env) == [8, 9]
    # a second launch of the finished job trains from 0 instead of resuming run-a's step 9
    assert _train(env, tmp_path, "b", 4, "run-b") == [0, 1, 2, 3]
    assert _held(env) == [3, 4], "run-a's steps were evicted first, not kept as an older timeline"


def test_ftd_ls_shows_the_job_and_ftd_rm_discards_it_through_the_live_daemon(tmp_path, daemon):
    env, _ = daemon
    _train(env, tmp_path, "a", 3, "run-a")
    shm = env["FTD_SHM_DIR"]
    listed = _ftd("ls", "--json", "--shm-dir", shm, env=env)
    assert listed.returncode == 0, listed.stderr
    [job] = json.loads(listed.stdout)
    assert (job["job"], job["daemon_live"], job["ranks"], job["runs"]) == (JOB, True, {"0": [2, 3]}, ["run-a"])
    assert job["segment_bytes"] > 0
    removed = _ftd("rm", JOB, "--shm-dir", shm, env=env)
    assert removed.returncode == 0, removed.stderr
    assert _held(env) == []
    assert not list(Path(shm, f"ftd-{JOB}").rglob("*.seg")), "free segments are given back too"
    assert _train(env, tmp_path, "again", 2, "run-a") == [0, 1], "nothing of run-a is left to resume"


def test_ftd_rm_removes_an_idle_job_directory_and_refuses_another_users(tmp_path, daemon):
    env, proc = daemon
    _train(env, tmp_path, "a", 2, "run-a")
    proc.kill()
    shm = env["FTD_SHM_DIR"]
    [job] = json.loads(_ftd("ls", "--json", "--shm-dir", shm, env=env).stdout)
    assert job["daemon_live"] is False and job["ranks"] == {"0": [1, 2]}
    job_dir = Path(shm, f"ftd-{JOB}")
    if os.geteuid() == 0:
        os.chown(job_dir, 54321, -1)
        refused = _ftd("rm", JOB, "--shm-dir", shm, env=env)
        assert refused.returncode == 2 and "uid 54321" in refused.stderr
        assert job_dir.is_dir()
        os.chown(job_dir, 0, -1)
    removed = _ftd("rm", JOB, "--shm-dir", shm, env=env)
    assert removed.returncode == 0, removed.stderr
    assert not job_dir.exists()
    assert json.loads(_ftd("ls", "--json", "--shm-dir", shm, env=env).stdout) == []
