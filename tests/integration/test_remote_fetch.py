"""A rank restarted on another node (ranks are reassigned when a node is replaced) finds its
snapshot on the peer that holds it, and resumes bit-exact."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import torch

from ftd.demo.procs import ftd_env, read_losses, start_trainer

from tests.bitexact import differing
from tests.integration.multinode import free_port, make_nodes

STEPS = 24


def test_rank_restored_on_another_node_fetches_from_its_peer(tmp_path: Path):
    ref = tmp_path / "reference"
    ref.mkdir()
    proc = start_trainer(["--steps", str(STEPS), "--no-ftd", "--losses", str(ref / "l.jsonl"),
                          "--out", str(ref / "p.pt")], dict(ftd_env(ref, "ref"), RANK="1"), ref / "train.log")
    assert proc.wait(120) == 0

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    nodes = make_nodes(cluster, 3, "2+1")
    try:
        metrics_port = free_port()
        nodes[2].env["FTD_METRICS_PORT"] = str(metrics_port)
        for node in nodes:
            node.start_daemon()
        assert nodes[0].trainer(["--steps", str(STEPS), "--stop-at", "9"], RANK="1").wait(120) == 0
        proc = nodes[2].trainer(["--steps", str(STEPS)], RANK="1")
        assert proc.wait(180) == 0, nodes[2].log.read_text()[-3000:]
        log = nodes[2].log.read_text()
        assert "rank 1 resumed at step 9" in log, log[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            scraped = reply.read().decode()
        # the rank reported a restore from peers, and node 2 pulled bytes from node 0
        assert re.search(r'^ftd_recoveries_total\{source="peers"\} 1\.0$', scraped, re.M), scraped
        assert re.search(r'^ftd_peer_received_bytes_total\{peer="0"\} [1-9]', scraped, re.M), scraped
        losses = {**read_losses(nodes[0].losses, 1), **read_losses(nodes[2].losses, 1)}
        assert losses == read_losses(ref / "l.jsonl", 1)
        got = torch.load(nodes[2].root / "params-1.pt", weights_only=True)
        want = torch.load(ref / "p.pt", weights_only=True)
        assert not differing(got, want), differing(got, want)
    finally:
        for node in nodes:
            node.close()
