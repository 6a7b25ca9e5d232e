"""Several EC nodes in one process: real stores in tmp shared-memory directories, real peer gRPC
on loopback, the in-process bulk fabric between them (ftd.daemon.inproc)."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ftd.codec import make_codec
from ftd.config import DaemonConfig
from ftd.daemon.erasure import ErasureCoding
from ftd.daemon.inproc import Fabric
from ftd.daemon.peers import Membership
from ftd.daemon.store import SegmentStore
from ftd.manifest import EntrySpec, Manifest, chunk_checksums, layout
from ftd.metrics import DaemonMetrics

JOB = "ec-inproc"
TOKEN = "inproc-ec-cluster-token-0123456789abcdef"
CHUNK = 64 << 10


def free_ports(n: int) -> list[int]:
    """`n` loopback ports that were free a moment ago (the peer gRPC services bind them)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def state_bytes(rank: int, step: int, nbytes: int) -> bytes:
    """The deterministic payload of (rank, step)."""
    seed = (rank * 1_000_003 + step * 7919).to_bytes(8, "little")
    block = bytes((b ^ i) & 0xFF for i, b in enumerate(seed * 512))
    return (block * (nbytes // len(block) + 1))[:nbytes]


class Cluster:
    """`n` nodes of one EC shape; node i runs rank i."""

    def __init__(self, root: Path, n: int, ec: str, state_bytes: int = 300_000, **settings: object):
        self.root, self.n, self.ec, self.nbytes = root, n, ec, state_bytes
        self.fabric = Fabric()
        self.peers = ",".join(f"127.0.0.1:{p}" for p in free_ports(n))
        self.settings = {"heartbeat_interval": 0.1, "peer_timeout": 1.0, "rebuild_wait": 5.0, **settings}
        self.nodes: dict[int, ErasureCoding] = {}
        self.generation = {i: 0 for i in range(n)}

    def config(self, node: int) -> DaemonConfig:
        shm = self.root / f"node{node}-{self.generation[node]}"
        return DaemonConfig.load(environ={}, job=JOB, socket=str(shm / "s.sock"), shm_dir=str(shm),
                                 memory_reserve="0", preallocate=False, peers=self.peers, node=str(node),
                                 ec=self.ec, codec="auto", cluster_token=TOKEN, metrics_port=0,
                                 **self.settings)

    def start(self, node: int) -> ErasureCoding:
        config = self.config(node)
        store = SegmentStore(config, DaemonMetrics())
        store.prepare_root()
        store.adopt(retain=False)
        membership = Membership.from_config(config)
        assert membership is not None
        group = membership.group
        ec = ErasureCoding(config, membership, store, make_codec("auto", group.k, group.m), store.metrics,
                           transport=self.fabric.transport(node))
        self.nodes[node] = ec.start()
        return ec

    def start_all(self) -> Cluster:
        for node in range(self.n):
            self.start(node)
        return self

    def lose(self, node: int) -> None:
        """Node `node` is gone with its memory; a replacement starts with an empty directory."""
        self.nodes.pop(node).stop()
        self.generation[node] += 1

    def replace(self, node: int) -> ErasureCoding:
        """Lose node `node` (unless it is gone already), start its replacement, wait for its rebuild check."""
        if node in self.nodes:
            self.lose(node)
        replacement = self.start(node)
        self.wait(f"the rebuild check of node {node}", replacement.protector.ready.is_set)
        return replacement

    def stop(self) -> None:
        for ec in self.nodes.values():
            ec.stop()
        self.nodes.clear()

    def seal(self, step: int, nodes: list[int] | None = None, world_size: int = 8) -> None:
        """Every (given) node's rank seals `step` (its manifest says `world_size`)."""
        for node in self.nodes if nodes is None else nodes:
            seal(self.nodes[node].store, node, step, self.nbytes, world_size)

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.describe()}")
            time.sleep(0.05)

    def wait_protected(self, step: int, timeout: float = 20.0) -> None:
        self.wait(f"step {step} protected on every node",
                  lambda: all(ec.protector.protected_step >= step for ec in self.nodes.values()), timeout)

    def describe(self) -> str:
        return "; ".join(f"node {n}: protected {ec.protector.protected_step}, rebuilding {ec.protector.rebuilding}, "
                         f"steps {sorted(ec.store.complete_steps())}" for n, ec in sorted(self.nodes.items()))


def seal(store: SegmentStore, rank: int, step: int, nbytes: int, world_size: int = 8) -> bytes:
    """Seal (rank, step) in `store` through Begin/Commit, as a rank would; return its data bytes."""
    specs = [EntrySpec("model/w", "param", "uint8", (nbytes,))]
    entries, total = layout(specs)
    lease = store.begin(JOB, rank, step, total)
    data = state_bytes(rank, step, total)
    with open(lease.path, "r+b") as f:
        f.write(data)
    view = memoryview(data)
    entries = [dataclasses.replace(e, checksums=chunk_checksums(view[e.offset:e.offset + e.nbytes], CHUNK))
               for e in entries]
    manifest = Manifest(job=JOB, rank=rank, world_size=world_size, step=step, chunk_bytes=CHUNK, data_bytes=total,
                        entries=tuple(entries), meta={"step": step})
    store.commit(JOB, rank, step, lease.lease, manifest.to_json())
    return data


def held_bytes(store: SegmentStore, rank: int, step: int) -> tuple[bytes, str]:
    """The sealed data bytes of (rank, step) in `store` and the source it reports."""
    path, _, manifest_json, source = store.open(JOB, rank, step)
    nbytes = Manifest.from_json(manifest_json).data_bytes
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, nbytes, 0), source
    finally:
        os.close(fd)


def metric(ec: ErasureCoding, name: str, labels: dict[str, str] | None = None) -> float:
    value = ec.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
