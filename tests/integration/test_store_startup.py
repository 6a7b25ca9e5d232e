"""A real `ftd daemon` process and its shm directory: stray entries never stop it; an unsafe job directory does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ftd.client.rpc import DaemonClient
from ftd.demo.procs import DaemonProcess, ftd_env

JOB = "storestart"


def test_the_daemon_starts_beside_stray_entries_and_serves(tmp_path: Path):
    env = ftd_env(tmp_path, JOB)
    root = tmp_path / "shm" / f"ftd-{JOB}"
    rank_dir = root / "rank-0"
    rank_dir.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    (rank_dir / "dangling.seg").symlink_to(tmp_path / "nowhere")
    (rank_dir / "adir.seg").mkdir()
    (rank_dir / "deep.seg").write_bytes(bytes(1 << 20))
    (rank_dir / "deep.manifest.json").write_bytes(b"{\"a\":" * 5000 + b"1" + b"}" * 5000)
    (root / "rank-3").write_bytes(b"not a directory")
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        client = DaemonClient(env["FTD_SOCKET"], JOB, 0, timeout=5)
        try:
            assert client.list_steps() == []
        finally:
            client.close()
        assert (rank_dir / "dangling.seg").is_symlink() and (rank_dir / "adir.seg").is_dir()
    finally:
        daemon.kill()


def test_the_daemon_refuses_a_job_directory_writable_by_others(tmp_path: Path):
    env = ftd_env(tmp_path, JOB)
    root = tmp_path / "shm" / f"ftd-{JOB}"
    root.mkdir(parents=True)
    os.chmod(root, 0o777)
    done = subprocess.run([sys.executable, "-m", "ftd", "daemon"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert list(root.iterdir()) == [], "nothing was created in the unsafe directory (daemon.lock included)"
    assert not os.path.exists(env["FTD_SOCKET"])
