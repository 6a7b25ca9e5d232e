"""Several simulated nodes on loopback for the integration tests (the machinery is ftd.demo.cluster)."""

from __future__ import annotations

from pathlib import Path

from ftd.demo.cluster import LocalNode, kill_tree, wait_protected
from ftd.demo.procs import free_port

TOKEN = "test-cluster-token-5f2c9a"
Node = LocalNode

__all__ = ["TOKEN", "Node", "free_port", "kill_tree", "make_nodes", "wait_protected"]


def make_nodes(tmp_path: Path, count: int, ec: str, host: str = "127.0.0.1", **env: str) -> list[LocalNode]:
    """`count` nodes of job "ectest" sharing the test cluster token (see ftd.demo.cluster.make_nodes)."""
    from ftd.demo.cluster import make_nodes as _make

    return _make(tmp_path, count, ec, host, job="ectest", token=TOKEN, **env)
