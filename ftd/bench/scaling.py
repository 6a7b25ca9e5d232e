"""Scaling on loopback: 2 -> 4 (-> 8) `ftd daemon` processes with erasure coding (k = n-1, m = 1),
each node holding one snapshot of `--scale-mib` MiB; time from the last seal until every node
reports the step protected, and the rebuild of a node that lost everything.

The nodes are those of the demo's local cluster (ftd.demo.cluster.make_nodes). The rebuild's own
duration is read from the replacement daemon's metrics (ftd_rebuild_seconds), never its log.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftd.bench.common import MIB, log
from ftd.demo.cluster import LocalNode, make_nodes, wait_protected

LOST = 1


def run_cluster(count: int, mib: int, timeout: float) -> dict[str, Any]:
    import ftd
    from ftd.client.rpc import DaemonClient

    ec = f"{count - 1}+1"
    root = Path(tempfile.mkdtemp(prefix="ftd-compare-scale-"))
    nodes: list[LocalNode] = make_nodes(root, count, ec, job=f"scale-{uuid.uuid4().hex[:6]}", FTD_KEEP="1",
                                        FTD_PREALLOCATE="0")
    snaps: list[Any] = []
    try:
        t0 = time.perf_counter()
        for node in nodes:
            node.start_daemon()
        res: dict[str, Any] = {"nodes": count, "ec": ec, "per_node_bytes": mib * MIB,
                               "daemons_up_s": time.perf_counter() - t0}
        for node in nodes:
            torch.manual_seed(100 + node.index)
            model = nn.Module()
            model.w = nn.Parameter(torch.randn(mib * MIB // 4))
            snaps.append(ftd.Snapshotter(model, job=node.env["FTD_JOB"], socket=node.env["FTD_SOCKET"], rank=0,
                                         world_size=1))
        t0 = time.perf_counter()
        for s in snaps:  # without an optimizer snapshot() copies at once
            s.snapshot(1)
        for s in snaps:
            s.wait()
        t_sealed = time.perf_counter()
        if any(s.stats.last_sealed_step != 1 for s in snaps):
            raise RuntimeError(f"not every node sealed step 1: {[dict(s.stats.skip_reasons) for s in snaps]}")
        wait_protected(nodes, 1, timeout, poll=0.02)
        res["sealed_s"] = t_sealed - t0
        res["protected_after_seal_s"] = time.perf_counter() - t_sealed
        log(f"[scale] {count} nodes (EC {ec}, {mib} MiB each): sealed in {res['sealed_s']:.2f} s, protected "
            f"{res['protected_after_seal_s']:.2f} s after the last seal")
        # node LOST loses everything; a replacement with its identity rebuilds from the survivors
        lost = nodes[LOST]
        snaps[LOST].close(timeout=10)
        lost.lose_everything()
        t0 = time.perf_counter()
        lost.start_daemon()
        client = DaemonClient(lost.env["FTD_SOCKET"], lost.env["FTD_JOB"], 0, timeout=timeout)
        try:
            steps = client.list_steps(rank=0, timeout=timeout)  # held while the daemon rebuilds
        finally:
            client.close()
        res["rebuild_end_to_end_s"] = time.perf_counter() - t0
        res["rebuild_steps"] = steps
        scrape = lost.metrics()
        if 1 not in steps or scrape.value("ftd_rebuilds_total", outcome="rebuilt") != 1:
            raise RuntimeError(f"replacement node {LOST} did not rebuild step 1 (List gave {steps}, rebuilds "
                               f"{scrape.by_label('ftd_rebuilds_total', 'outcome')})")
        res["rebuild_s"] = scrape.value("ftd_rebuild_seconds_sum")
        log(f"[scale] {count} nodes: node {LOST} rebuilt in {res['rebuild_s']:.2f} s (daemon's clock), "
            f"{res['rebuild_end_to_end_s']:.2f} s from start to List")
        return res
    finally:
        for i, s in enumerate(snaps):
            if i != LOST:
                s.close(timeout=10)
        for node in nodes:
            if node.daemon is not None:
                try:
                    node.daemon.stop()
                except Exception:  # noqa: BLE001
                    node.daemon.kill()
            shutil.rmtree(node.shm, ignore_errors=True)
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
