"""Scaling on loopback: 2 -> 4 (-> 8) `ftd daemon` processes with erasure coding (k = n-1, m = 1),
each node holding one snapshot of `--scale-mib` MiB; time from the last seal until every node
reports the step protected, and the rebuild of a node that lost everything.

The node setup follows tests/integration/multinode.py (own socket, shm directory and peer ports
per node); the few lines it needs are copied here because `tests` is not installed with ftd.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftd.bench.common import MIB, log
from ftd.demo.procs import free_port_pair
from ftd.errors import FtdError

TOKEN = "ftd-bench-cluster-token-" + uuid.uuid4().hex
REBUILT_RE = re.compile(r"rebuilt node (\d+) step (\d+) from peers in ([\d.]+) s")
LOST = 1



def node_envs(root: Path, count: int, ec: str, job: str) -> list[dict[str, str]]:
    from ftd.demo.procs import ftd_env

    ports = [free_port_pair() for _ in range(count)]
    tag = uuid.uuid4().hex[:8]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else root
    envs = []
    for i in range(count):
        (root / f"node{i}").mkdir()
        envs.append(ftd_env(root / f"node{i}", job, FTD_SHM_DIR=str(shm_root / f"ftd-bench-{tag}-n{i}"),
                            FTD_NODE=str(i), FTD_PEERS=peers, FTD_EC=ec, FTD_CLUSTER_TOKEN=TOKEN,
                            FTD_HEARTBEAT_INTERVAL="0.2", FTD_PEER_TIMEOUT="2", FTD_REBUILD_WAIT="20",
                            FTD_LOG_LEVEL="INFO", FTD_KEEP="1", FTD_PREALLOCATE="0"))
    return envs


def status_of(env: dict[str, str]) -> Any:
    from ftd.client.rpc import DaemonClient

    client = DaemonClient(env["FTD_SOCKET"], env["FTD_JOB"], 0, timeout=5)
    try:
        return client.status()
    finally:
        client.close()


def wait_protected(envs: list[dict[str, str]], step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            steps = [status_of(e).protected_step for e in envs]
        except FtdError:
            steps = [-1]
        if min(steps) >= step:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"protected steps {steps} did not reach {step} within {timeout} s")
        time.sleep(0.02)


def run_cluster(count: int, mib: int, timeout: float) -> dict[str, Any]:
    import ftd
    from ftd.client.rpc import DaemonClient
    from ftd.demo.procs import DaemonProcess

    ec = f"{count - 1}+1"
    root = Path(tempfile.mkdtemp(prefix="ftd-compare-scale-"))
    envs = node_envs(root, count, ec, f"scale-{uuid.uuid4().hex[:6]}")
    daemons: list[DaemonProcess] = []
    snaps: list[Any] = []
    try:
        t0 = time.perf_counter()
        for i, env in enumerate(envs):
            daemons.append(DaemonProcess(env, root / f"node{i}" / "daemon.log").start())
        res: dict[str, Any] = {"nodes": count, "ec": ec, "per_node_bytes": mib * MIB,
                               "daemons_up_s": time.perf_counter() - t0}
        for i, env in enumerate(envs):
            torch.manual_seed(100 + i)
            model = nn.Module()
            model.w = nn.Parameter(torch.randn(mib * MIB // 4))
            snaps.append(ftd.Snapshotter(model, job=env["FTD_JOB"], socket=env["FTD_SOCKET"], rank=0, world_size=1))
        t0 = time.perf_counter()
        for s in snaps:  # without an optimizer snapshot() copies at once
            s.snapshot(1)
        for s in snaps:
            s.wait()
        t_sealed = time.perf_counter()
        if any(s.stats.last_sealed_step != 1 for s in snaps):
            raise RuntimeError(f"not every node sealed step 1: {[dict(s.stats.skip_reasons) for s in snaps]}")
        wait_protected(envs, 1, timeout)
        res["sealed_s"] = t_sealed - t0
        res["protected_after_seal_s"] = time.perf_counter() - t_sealed
        log(f"[scale] {count} nodes (EC {ec}, {mib} MiB each): sealed in {res['sealed_s']:.2f} s, protected "
            f"{res['protected_after_seal_s']:.2f} s after the last seal")
        # node LOST loses everything; a replacement with its identity rebuilds from the survivors
        snaps[LOST].close(timeout=10)
        daemons[LOST].kill()
        shutil.rmtree(envs[LOST]["FTD_SHM_DIR"], ignore_errors=True)
        log_path = root / f"node{LOST}" / "daemon.log"
        n_lines = len(log_path.read_text(errors="replace").splitlines())
        t0 = time.perf_counter()
        daemons[LOST] = DaemonProcess(envs[LOST], log_path).start()
        client = DaemonClient(envs[LOST]["FTD_SOCKET"], envs[LOST]["FTD_JOB"], 0, timeout=timeout)
        try:
            steps = client.list_steps(rank=0, timeout=timeout)  # held while the daemon rebuilds
        finally:
            client.close()
        res["rebuild_end_to_end_s"] = time.perf_counter() - t0
        res["rebuild_steps"] = steps
        for line in log_path.read_text(errors="replace").splitlines()[n_lines:]:
            if m := REBUILT_RE.search(line):
                res["rebuild_s"] = float(m.group(3))
        if 1 not in steps or "rebuild_s" not in res:
            raise RuntimeError(f"replacement node {LOST} did not rebuild step 1 (List gave {steps})")
        log(f"[scale] {count} nodes: node {LOST} rebuilt in {res['rebuild_s']:.2f} s (daemon's clock), "
            f"{res['rebuild_end_to_end_s']:.2f} s from start to List")
        return res
    finally:
        for i, s in enumerate(snaps):
            if i != LOST:
                s.close(timeout=10)
        for d in daemons:
            try:
                d.stop()
            except Exception:  # noqa: BLE001
                d.kill()
        for env in envs:
            shutil.rmtree(env["FTD_SHM_DIR"], ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def run_scaling(counts: list[int], mib: int, timeout: float) -> dict[str, Any]:
    import psutil

    out: dict[str, Any] = {"per_node_mib": mib, "clusters": []}
    for n in counts:
        need = n * (mib * MIB * 3 + 400 * MIB)  # segment + parity + rebuild buffers + a daemon process
        if psutil.virtual_memory().available < need * 1.5:
            out["clusters"].append({"nodes": n, "skipped": f"needs about {need / 2**30:.1f} GiB, "
                                    f"{psutil.virtual_memory().available / 2**30:.1f} GiB available"})
            continue
        try:
            out["clusters"].append(run_cluster(n, mib, timeout))
        except Exception as exc:  # noqa: BLE001
            log(f"[scale] {n} nodes FAILED: {type(exc).__name__}: {exc}")
            out["clusters"].append({"nodes": n, "error": f"{type(exc).__name__}: {exc}"})
    return out
