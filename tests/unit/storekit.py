"""Helpers of the segment-store unit tests: a store in a tmp directory and sealed snapshots in it."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

from ftd.config import DaemonConfig
from ftd.daemon.store import SegmentStore
from ftd.manifest import EntrySpec, Manifest, chunk_checksums, layout
from ftd.metrics import DaemonMetrics

JOB = "job-a"
CHUNK = 4096
MiB = 1 << 20


def _config(tmp_path: Path, job: str = JOB, **overrides) -> DaemonConfig:
    # preallocate=False: these tests count segments; test_preallocation_prepares_segments_per_rank covers it
    values = dict(job=job, socket=str(tmp_path / "s.sock"), shm_dir=str(tmp_path / "shm"), memory_reserve="0",
                  preallocate=False)
    values.update(overrides)
    return DaemonConfig.load(environ={}, **values)


def _store(tmp_path: Path, **overrides) -> SegmentStore:
    store = SegmentStore(_config(tmp_path, **overrides), DaemonMetrics())
    store.adopt()
    return store


def _specs(step: int) -> list[EntrySpec]:
    return [EntrySpec("model/w", "param", "float32", (16, 16)), EntrySpec("model/n", "buffer", "int64", (step % 5 + 1,)),
            EntrySpec("rng/torch", "rng", "uint8", (100,))]


def _fill(path: str, total: int, step: int) -> memoryview:
    data = bytes((step * 31 + i) % 256 for i in range(total))
    with open(path, "r+b") as f:
        f.write(data)
    return memoryview(data)


def _manifest(step: int, path: str | None = None, job: str = JOB, rank: int = 0, **changes) -> Manifest:
    entries, total = layout(_specs(step))
    data = _fill(path, total, step) if path else memoryview(bytes(total))
    entries = [dataclasses.replace(e, checksums=chunk_checksums(data[e.offset:e.offset + e.nbytes], CHUNK))
               for e in entries]
    fields = dict(job=job, rank=rank, world_size=2, step=step, chunk_bytes=CHUNK, data_bytes=total,
                  entries=tuple(entries), meta={"step": step})
    fields.update(changes)
    return Manifest(**fields)


def _snapshot(store: SegmentStore, step: int, rank: int = 0, nbytes: int | None = None) -> list[int]:
    _, total = layout(_specs(step))
    lease = store.begin(JOB, rank, step, nbytes or total)
    return store.commit(JOB, rank, step, lease.lease, _manifest(step, lease.path, rank=rank).to_json())


def _segs(store: SegmentStore, rank: int = 0) -> list[Path]:
    return sorted((store.root / f"rank-{rank}").glob("*.seg"))


def _manifests(store: SegmentStore, rank: int = 0) -> list[Path]:
    return sorted((store.root / f"rank-{rank}").glob("*.manifest.json"))


def _metric(store: SegmentStore, name: str, labels: dict | None = None) -> float:
    return store.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def fill_up(directory: Path) -> None:
    """Write zeros into `directory` (a small tmpfs) until it refuses more with ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
