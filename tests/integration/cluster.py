"""Fixtures and helpers of the integration tests: the local cluster of ftd.demo.cluster, real processes.

`node` is one simulated node (ftd.demo.cluster.LocalNode) with a running daemon; `make_nodes`
gives several that protect each other; `reference` is an uninterrupted run without ftd.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ftd.demo import results
from ftd.demo.cluster import LocalNode, Reference, kill_tree, single_node, wait_protected
from ftd.demo.cluster import make_nodes as _make_nodes
from ftd.demo.procs import free_port, read_losses
from ftd.manifest import Manifest
from tests.bitexact import differing

STEPS = 24
TRAIN_ARGS = ["--steps", str(STEPS)]
TOKEN = "test-cluster-token-5f2c9a"
Node = LocalNode

__all__ = ["STEPS", "TRAIN_ARGS", "TOKEN", "Node", "Reference", "assert_bit_exact", "free_port", "kill_tree",
           "make_nodes", "node", "reference", "restores", "sealed_globals", "wait_protected"]


def make_nodes(tmp_path: Path, count: int, ec: str, host: str = "127.0.0.1", **env: str) -> list[LocalNode]:
    """`count` nodes of job "ectest" sharing the test cluster token (see ftd.demo.cluster.make_nodes)."""
    return _make_nodes(tmp_path, count, ec, host, job="ectest", token=TOKEN, **env)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalNode]:
    """A node with its own shm directory (under /dev/shm when it exists), metrics port and a running daemon."""
    cluster = single_node(tmp_path, "itest")
    cluster.start_daemon()
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(cluster.shm, ignore_errors=True)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Losses and final parameters of an uninterrupted single-process run without ftd."""
    return Reference(tmp_path_factory.mktemp("reference"), 1, TRAIN_ARGS).start().wait(180)


def restores(node: LocalNode, rank: int = 0) -> list[results.Record]:
    """The restore records of `rank`'s trainers on this node, oldest first."""
    return [r for r in results.restores(node.results()) if r["rank"] == rank]


def assert_bit_exact(node: LocalNode, reference: Reference, rank: int = 0) -> None:
    """Every step's loss and every final parameter equal the reference, bit for bit."""
    ref_losses = reference.rank_losses(rank)
    losses = read_losses(node.losses, rank)
    assert sorted(losses) == sorted(ref_losses)
    diverged = [s for s in ref_losses if losses[s] != ref_losses[s]]
    assert not diverged, f"losses differ from step {diverged[0]}: {losses[diverged[0]]} vs {ref_losses[diverged[0]]}"
    params, ref_params = node.params(rank), reference.params(rank)
    assert not differing(params, ref_params), f"rank {rank}: {differing(params, ref_params)} differ"


def sealed_globals(nodes: list[LocalNode], step: int, world_size: int = 0) -> dict[str, torch.Tensor]:
    """Every global tensor of `step` (taken by a world of `world_size`, when given) assembled from the sealed
    segments in the nodes' shared memory."""
    out: dict[str, torch.Tensor] = {}
    for node in nodes:
        for path in node.shm.glob("ftd-*/rank-*/*.manifest.json"):
            manifest = Manifest.from_json(path.read_bytes())
            if manifest.step != step or (world_size and manifest.world_size != world_size):
                continue
            data = path.with_name(path.name.replace(".manifest.json", ".seg")).read_bytes()
            for e in manifest.entries:
                p = e.placement
                if p is None:
                    continue
                dtype = getattr(torch, e.dtype)
                piece = torch.frombuffer(bytearray(data[e.offset:e.offset + e.nbytes]), dtype=torch.uint8)
                piece = piece.view(dtype).reshape(p.box) if e.nbytes else torch.empty(p.box, dtype=dtype)
                full = out.setdefault(p.fqn, torch.zeros(p.shape, dtype=dtype))
                index = tuple(slice(o, o + b) for o, b in zip(p.offsets, p.box))
                full[index] = piece
    return out
