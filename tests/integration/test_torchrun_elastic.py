"""Three simulated nodes under real elastic torchrun (c10d rendezvous on a store outside the nodes).
One node is lost whole — agent, worker, daemon and memory — and replaced by a new agent + daemon with
the same node identity. torchrun reassigns ranks; every rank finds its snapshot wherever the group
holds it (rebuilt by erasure coding or fetched from the peer that has it) and the run ends bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import torch

from ftd.demo.procs import ftd_env, start_trainer

from tests.integration.multinode import Node, free_port, make_nodes, wait_protected

STEPS = 24
NODES = 3


def _store(port: int) -> subprocess.Popen[bytes]:
    code = ("import torch.distributed as d, datetime, time; "
            f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, multi_tenant=True, wait_for_workers=False, "
            "timeout=datetime.timedelta(seconds=120)); time.sleep(1e9)")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _agent(node: Node, port: int, job: str) -> subprocess.Popen[bytes]:
    env = dict(node.env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}", "--max-restarts=3",
            "--rdzv-conf=is_host=0,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120",
            "--monitor-interval=0.5", "-m", "ftd.demo.train", "--steps", str(STEPS), "--step-sleep", "0.25",
            "--losses", str(node.losses), "--out", str(node.root / "params-{rank}.pt")]
    with open(node.log, "ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node.trainers.append(proc)
    return proc


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a dying machine would."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _all_losses(paths: list[Path]) -> dict[tuple[int, int], set[str]]:
    """(rank, step) -> every loss recorded for it, across nodes and restarts (all must agree)."""
    seen: dict[tuple[int, int], set[str]] = defaultdict(set)
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                seen[(doc["rank"], doc["step"])].add(doc["loss"])
    return seen


def test_node_replaced_under_torchrun_ranks_reassigned_bit_exact(tmp_path: Path):
    ref_root = tmp_path / "reference"
    ref_root.mkdir()
    master = free_port()
    refs = []
    for rank in range(NODES):
        env = dict(ftd_env(ref_root, "ref"), RANK=str(rank), WORLD_SIZE=str(NODES), LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
        refs.append(start_trainer(["--steps", str(STEPS), "--no-ftd", "--losses", str(ref_root / f"l{rank}.jsonl"),
                                   "--out", str(ref_root / "p-{rank}.pt")], env, ref_root / "train.log"))
    assert all(p.wait(300) == 0 for p in refs), (ref_root / "train.log").read_text()[-3000:]
    reference = _all_losses([ref_root / f"l{r}.jsonl" for r in range(NODES)])

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    nodes = make_nodes(cluster, NODES, "2+1")
    port = free_port()
    store = _store(port)
    try:
        for node in nodes:
            node.start_daemon()
        agents = [_agent(node, port, "elastic") for node in nodes]
        deadline = time.monotonic() + 300
        while max((s for (_, s) in _all_losses([n.losses for n in nodes])), default=-1) < 8:
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), nodes[0].log.read_text()[-3000:]
            time.sleep(0.1)
        wait_protected(nodes, 4)
        victim = nodes[0]
        _kill_tree(agents[0].pid)  # the agent and its worker (torchrun starts workers in their own session)
        victim.lose_everything()
        victim.start_daemon()
        _agent(victim, port, "elastic")
        for agent in [*agents[1:], victim.trainers[-1]]:
            assert agent.wait(400) == 0, "\n".join(n.log.read_text()[-2000:] for n in nodes)
    finally:
        for node in nodes:
            node.close()
        os.killpg(store.pid, signal.SIGKILL)

    logs = "\n".join(n.log.read_text() for n in nodes)
    assert "rebuilt node 0 step" in victim.daemon_log.read_text()
    import re

    resumed = re.findall(r"rank (\d+) resumed at step (\d+)", logs)
    assert sorted(int(r) for r, _ in resumed[-NODES:]) == list(range(NODES)), logs[-3000:]
    assert len({s for _, s in resumed[-NODES:]}) == 1, f"ranks resumed at different steps: {resumed}"
    got = _all_losses([n.losses for n in nodes])
    assert set(got) == set(reference)
    diverged = sorted(k for k in got if got[k] != reference[k])
    assert not diverged, f"losses differ at (rank, step) {diverged[:5]}: {got[diverged[0]]} vs {reference[diverged[0]]}"
    want = torch.load(ref_root / "p-0.pt", weights_only=True)
    for path in cluster.glob("node*/params-*.pt"):
        params = torch.load(path, weights_only=True)
        assert all(torch.equal(params[k], v) for k, v in want.items()), f"{path} differs"
