"""Reading the durable tier back: committed steps, verified, and a rank's segment rebuilt from them.

Nothing is trusted before it is checked: the commit marker's digest, then the index's bytes
against the marker, a sidecar's bytes against the index, a safetensors header against the
sidecar, and finally every entry's bytes against the chunk checksums of the rank's own manifest.
A step that fails any check is a `DurableCorrupt`, and the caller goes on with an older one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ftd.durable import layout
from ftd.durable.layout import Index, RankRecord
from ftd.durable.safetensors import read_header
from ftd.errors import FtdError, ManifestError, SnapshotCorrupt
from ftd.manifest import Manifest

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class DurableCorrupt(FtdError):
    """A durable step failed verification (a file missing, truncated, edited or corrupted)."""


def committed_steps(job_root: Path) -> list[int]:
    """Steps with a commit marker, oldest first (not yet verified)."""
    if not job_root.is_dir():
        return []
    out = []
    for child in job_root.iterdir():
        step = layout.step_of(child.name)
        if step is not None and not child.is_symlink() and (child / layout.COMMIT).is_file():
            out.append(step)
    return sorted(out)


def _read(path: Path, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        raise DurableCorrupt(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DurableCorrupt(f"{path} is larger than {limit} bytes")
    return data


@dataclass
class DurableStep:
    """A committed step whose commit marker and index checked out."""

    path: Path
    index: Index

    @classmethod
    def open(cls, job_root: Path, step: int) -> DurableStep:
        path = job_root / f"step-{step:012d}"
        try:
            marker = layout.unsealed(_read(path / layout.COMMIT, 1 << 16), "commit marker", 1 << 16)
            raw = _read(path / layout.INDEX, layout.MAX_INDEX_BYTES)
            if xxhash.xxh3_64_hexdigest(raw) != marker.get("index_xxh3"):
                raise DurableCorrupt(f"{path / layout.INDEX} does not match its commit marker")
            index = Index.from_bytes(raw, str(path / layout.INDEX))
        except ManifestError as exc:
            raise DurableCorrupt(str(exc)) from None
        if index.step != step:
            raise DurableCorrupt(f"{path} holds an index for step {index.step}")
        return cls(path, index)

    def record(self, rank: int) -> RankRecord:
        """Rank `rank`'s sidecar, checked against the index."""
        if rank not in self.index.sidecars:
            raise DurableCorrupt(f"step {self.index.step} has no rank {rank} (world {self.index.world_size})")
        path = self.path / layout.sidecar_file(rank)
        raw = _read(path, layout.MAX_SIDECAR_BYTES)
        if xxhash.xxh3_64_hexdigest(raw) != self.index.sidecars[rank]:
            raise DurableCorrupt(f"{path} does not match the step's index")
        try:
            return RankRecord.from_bytes(raw, str(path))
        except ManifestError as exc:
            raise DurableCorrupt(str(exc)) from None

    def check_header(self, rank: int, f: object) -> None:
        """The safetensors header of rank `rank`'s file is the one its sidecar recorded."""
        path = self.path / layout.tensors_file(rank)
        size = os.fstat(f.fileno()).st_size  # type: ignore[attr-defined]
        f.seek(0)  # type: ignore[attr-defined]
        prefix = f.read(8)  # type: ignore[attr-defined]
        if len(prefix) < 8:
            raise DurableCorrupt(f"{path} is truncated")
        length = int.from_bytes(prefix, "little")
        if length > size:
            raise DurableCorrupt(f"{path} is truncated")
        head = prefix + f.read(length)  # type: ignore[attr-defined]
        if xxhash.xxh3_64_hexdigest(head) != self.index.headers.get(rank):
            raise DurableCorrupt(f"{path}: header does not match the sidecar")
        try:
            read_header(head, size)
        except ManifestError as exc:
            raise DurableCorrupt(f"{path}: {exc}") from None

    def segment(self, rank: int) -> tuple[bytes, bytearray]:
        """(manifest JSON, segment bytes) of rank `rank`, every entry verified against its manifest."""
        rec = self.record(rank)
        try:
            manifest = Manifest.from_json(rec.manifest_json)
        except ManifestError as exc:
            raise DurableCorrupt(f"rank {rank}'s manifest: {exc}") from None
        if (manifest.rank, manifest.step, manifest.world_size) != (rank, self.index.step, self.index.world_size):
            raise DurableCorrupt(f"rank {rank}'s sidecar holds the manifest of rank {manifest.rank} step "
                                 f"{manifest.step}")
        data = bytearray(manifest.data_bytes)
        files: dict[tuple[str, int], object] = {}

        def source(kind: str, owner: int):
            key = (kind, owner)
            if key not in files:
                name = layout.raw_file(owner) if kind == "raw" else layout.tensors_file(owner)
                try:
                    files[key] = f = open(self.path / name, "rb")  # noqa: SIM115 - closed below
                except OSError as exc:
                    raise DurableCorrupt(f"{self.path / name}: {exc.strerror}") from None
                if kind == "tensors":
                    self.check_header(owner, f)
            return files[key]

        try:
            for e in manifest.entries:
                if e.name in rec.raw:
                    f, span = source("raw", rank), rec.raw[e.name]
                elif e.name in rec.tensors:
                    f, span = source("tensors", rank), rec.tensors[e.name]
                elif e.placement is not None and (piece := self.index.find(e.placement.fqn, e.placement.offsets)):
                    f, span = source("tensors", piece.rank), piece.span
                else:
                    raise DurableCorrupt(f"rank {rank} step {self.index.step}: no file holds entry {e.name}")
                if span[1] - span[0] != e.nbytes:
                    raise DurableCorrupt(f"entry {e.name}: {span[1] - span[0]} bytes on disk for {e.nbytes}")
                f.seek(span[0])  # type: ignore[attr-defined]
                view = memoryview(data)[e.offset:e.offset + e.nbytes]
                if f.readinto(view) != e.nbytes:  # type: ignore[attr-defined]
                    raise DurableCorrupt(f"entry {e.name}: file truncated")
            manifest.verify(memoryview(data))
        except SnapshotCorrupt as exc:
            raise DurableCorrupt(f"step {self.index.step}: {exc}") from None
        finally:
            for f in files.values():
                f.close()  # type: ignore[attr-defined]
        return rec.manifest_json, data


def committed_worlds(job_root: Path) -> dict[int, int]:
    """Committed step -> the world size its marker names (unverified; a marker that does not parse is left out)."""
    out = {}
    for step in committed_steps(job_root):
        try:
            world = json.loads(_read(job_root / f"step-{step:012d}" / layout.COMMIT, 1 << 16)).get("world_size")
        except (OSError, ValueError, AttributeError, DurableCorrupt):
            continue
        if type(world) is int and world > 0:
            out[step] = world
    return out


def describe(job_root: Path) -> list[dict[str, object]]:
    """Committed steps for `ftd ls`: step, world size, bytes, commit time (unverified, read from the marker)."""
    out = []
    for step in committed_steps(job_root):
        path = job_root / f"step-{step:012d}"
        try:
            marker = json.loads(_read(path / layout.COMMIT, 1 << 16))
            nbytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        except (OSError, ValueError, DurableCorrupt):
            continue
        out.append({"step": step, "world_size": marker.get("world_size"), "bytes": nbytes,
                    "committed_at": marker.get("committed_at")})
    return out
