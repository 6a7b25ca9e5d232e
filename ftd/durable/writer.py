"""Writing the durable tier: one rank's files straight from its segment, a step's commit, retention.

The bytes go from a read-only mapping of the shared-memory segment into `write` (no copy in
Python), in chunks paced by a `Throttle`. Every file is written under a temporary
name, fsynced and renamed, then the directory is fsynced, so a crash at any point leaves either
the previous version or nothing under the final name. Two daemons that write the same rank (a
rank that moved) produce the same bytes and the renames are atomic. The step is committed by
whichever daemon finds every rank's sidecar in place: it writes the index, then the commit marker.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from ftd.durable import layout
from ftd.durable.layout import Index, Piece, RankRecord
from ftd.durable.safetensors import DTYPES, Tensor, header
from ftd.errors import FtdError, ManifestError
from ftd.manifest import Entry, Manifest

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class DurableError(FtdError):
    """A step cannot be written or committed (a rank's pieces do not add up, the target misbehaves)."""


class Stopped(DurableError):
    """The writer was asked to stop mid-file."""


class Throttle:
    """Paces writes to `bytes_per_s` (0: as fast as the disk goes); `stop` ends a wait early."""

    def __init__(self, bytes_per_s: float, stop: threading.Event | None = None):
        self.rate, self.stop = bytes_per_s, stop or threading.Event()
        self._t0, self._sent = time.monotonic(), 0
        # pieces of about 50 ms at the rate, so the pace is smooth (64 KiB .. CHUNK_BYTES)
        self.chunk = CHUNK_BYTES if bytes_per_s <= 0 else int(min(CHUNK_BYTES, max(64 << 10, bytes_per_s / 20)))

    def restart(self) -> None:
        self._t0, self._sent = time.monotonic(), 0

    def consume(self, nbytes: int) -> None:
        if self.stop.is_set():
            raise Stopped("stopping")
        self._sent += nbytes
        if self.rate > 0:
            ahead = self._sent / self.rate - (time.monotonic() - self._t0)
            if ahead > 0 and self.stop.wait(ahead):
                raise Stopped("stopping")


def split(manifest: Manifest) -> tuple[list[Entry], list[Entry]]:
    """(entries this rank writes to its safetensors file, entries for its raw side file).

    A placed entry goes to the safetensors file when this rank is its writer and safetensors has
    its dtype; an entry without placement (or of a dtype safetensors lacks) to the raw file; a
    placed entry another replica writes to neither.
    """
    tensors, raw, seen = [], [], set()
    for e in manifest.entries:
        p = e.placement
        if p is not None and e.dtype in DTYPES:
            if p.write and p.fqn not in seen:
                seen.add(p.fqn)
                tensors.append(e)
            elif p.write:
                raw.append(e)
        else:
            raw.append(e)
    return tensors, raw


def write_rank(step_dir: Path, segment: str, manifest_json: bytes, throttle: Throttle, tag: str) -> RankRecord:
    """Write one rank's safetensors file, raw side file and sidecar for a sealed segment; return the sidecar."""
    manifest = Manifest.from_json(manifest_json)
    if manifest.format < 3:
        raise DurableError(f"rank {manifest.rank} step {manifest.step} is a format-{manifest.format} snapshot "
                           "without global placements; it cannot be written to the durable tier")
    tensors, raw = split(manifest)
    specs = [Tensor(e.placement.fqn, e.dtype, e.placement.box, e.placement.offsets, e.nbytes)  # type: ignore[union-attr]
             for e in tensors]
    head, spans = header(specs, {"ftd_rank": str(manifest.rank), "ftd_step": str(manifest.step)})
    fd = os.open(segment, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        st_name = layout.tensors_file(manifest.rank)
        _write_file(step_dir / st_name, fd, head, [(e.offset, e.nbytes) for e in tensors], throttle, tag)
        if raw:  # none when every entry is a placed piece another rank or this file holds
            _write_file(step_dir / layout.raw_file(manifest.rank), fd, b"", [(e.offset, e.nbytes) for e in raw],
                        throttle, tag)
    finally:
        os.close(fd)
    base = len(head)
    record = RankRecord(
        manifest.job, manifest.step, manifest.rank, manifest.world_size, manifest.run, manifest_json,
        tensors={e.name: (base + spans[e.placement.fqn][0], base + spans[e.placement.fqn][1])  # type: ignore[union-attr]
                 for e in tensors},
        raw=_packed(raw), header_xxh3=xxhash.xxh3_64_hexdigest(head),
        tensors_bytes=base + sum(e.nbytes for e in tensors), raw_bytes=sum(e.nbytes for e in raw))
    write_small(step_dir / layout.sidecar_file(manifest.rank), record.to_bytes(), tag)
    return record


def _packed(entries: list[Entry]) -> dict[str, tuple[int, int]]:
    out, at = {}, 0
    for e in entries:
        out[e.name] = (at, at + e.nbytes)
        at += e.nbytes
    return out


def _write_file(path: Path, src_fd: int, head: bytes, ranges: list[tuple[int, int]], throttle: Throttle,
                tag: str) -> None:
    """`head`, then the `ranges` (offset, bytes) of the segment `src_fd`, paced by `throttle`.

    The bytes go from a read-only mapping of the segment straight into `write` (no copy in
    Python). Not `sendfile`: the file packs tensors that lie 64-byte aligned in the segment, so
    source and target offsets differ modulo the page size, and a misaligned sendfile measured
    about twice as slow as a write from the mapping (bench/README.md, "Durable tier").
    """
    size = os.fstat(src_fd).st_size
    if any(offset + nbytes > size for offset, nbytes in ranges):
        raise DurableError(f"{path.name}: the segment holds {size} bytes, fewer than its manifest covers")

    def fill(out: int) -> None:
        _write_all(out, head)
        if not ranges or size == 0:
            return
        with mmap.mmap(src_fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ) as mapped:
            view, piece = memoryview(mapped), None
            try:
                for offset, nbytes in ranges:
                    for at in range(offset, offset + nbytes, throttle.chunk):
                        piece = view[at:min(at + throttle.chunk, offset + nbytes)]
                        _write_all(out, piece)
                        throttle.consume(len(piece))
            finally:
                del piece
                view.release()

    _atomic(path, tag, fill)


def write_small(path: Path, data: bytes, tag: str) -> None:
    """Write `data` to `path` atomically and durably (temp file, fsync, rename, fsync the directory)."""
    _atomic(path, tag, lambda fd: _write_all(fd, data))
    fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _atomic(path: Path, tag: str, fill: Callable[[int], None]) -> None:
    """Create `.<name>.<tag>.tmp` beside `path`, `fill` it, fsync and rename it; on any failure remove it."""
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    _unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o640)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def try_commit(step_dir: Path, world_size: int, tag: str) -> bool:
    """Commit the step when every rank's sidecar is there: index, then marker. False while ranks are missing.

    DurableError when the sidecars disagree or the written pieces do not cover every global tensor
    exactly (the step can never commit).
    """
    if (step_dir / layout.COMMIT).exists():
        return True
    records, digests = {}, {}
    for rank in range(world_size):
        path = step_dir / layout.sidecar_file(rank)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return False
        records[rank], digests[rank] = RankRecord.from_bytes(raw, str(path)), xxhash.xxh3_64_hexdigest(raw)
    if records[0].world_size != world_size:
        raise DurableError(f"rank 0's sidecar is for a world of {records[0].world_size}, not {world_size}")
    index_bytes = build_index(records, digests).to_bytes()
    write_small(step_dir / layout.INDEX, index_bytes, tag)
    marker = layout.sealed({"format": layout.FORMAT, "step": records[0].step, "world_size": world_size,
                            "index_xxh3": xxhash.xxh3_64_hexdigest(index_bytes), "committed_at": time.time()})
    write_small(step_dir / layout.COMMIT, marker, tag)
    for stale in step_dir.glob(".*.tmp"):  # left by a writer that died mid-file; every rank is in place now
        _unlink(stale)
    return True


def build_index(records: dict[int, RankRecord], digests: dict[int, str]) -> Index:
    """The index of a step from every rank's sidecar (and the checksum of each sidecar file's bytes);
    DurableError when they do not form one checkpoint."""
    first = records[min(records)]
    globals_: dict[str, tuple[str, tuple[int, ...], list[Piece]]] = {}
    needed: set[tuple[str, tuple[int, ...]]] = set()
    created = 0.0
    for rank, rec in sorted(records.items()):
        if (rec.job, rec.step, rec.world_size, rec.run, rec.rank) != (first.job, first.step, first.world_size,
                                                                      first.run, rank):
            raise DurableError(f"rank {rank}'s sidecar is for job {rec.job!r} step {rec.step} world "
                               f"{rec.world_size} run {rec.run!r}, not that of rank {first.rank}")
        try:
            manifest = Manifest.from_json(rec.manifest_json)
        except ManifestError as exc:
            raise DurableError(f"rank {rank}'s sidecar holds a bad manifest: {exc}") from None
        created = max(created, manifest.created_at)
        for e in manifest.entries:
            p = e.placement
            if p is None or e.dtype not in DTYPES:
                continue
            needed.add((p.fqn, p.offsets))
            if e.name not in rec.tensors:
                continue
            dtype, shape, pieces = globals_.setdefault(p.fqn, (e.dtype, p.shape, []))
            if (dtype, shape) != (e.dtype, p.shape):
                raise DurableError(f"{p.fqn}: rank {rank} holds {e.dtype}{list(p.shape)}, another rank "
                                   f"{dtype}{list(shape)}")
            same = next((q for q in pieces if q.offsets == p.offsets), None)
            if same is None:
                pieces.append(Piece(p.offsets, p.box, rank, rec.tensors[e.name]))
            elif same.box != p.box:  # the same corner twice (replicas that each wrote their copy): one is indexed
                raise DurableError(f"{p.fqn}: ranks {same.rank} and {rank} hold different boxes at {list(p.offsets)}")
    for fqn, (dtype, shape, pieces) in globals_.items():
        covered = sum(math.prod(p.box) for p in pieces)
        if covered != math.prod(shape) or _overlap(pieces):
            raise DurableError(f"{fqn}: the written pieces cover {covered} of {math.prod(shape)} elements "
                               f"({len(pieces)} pieces): replicas did not agree on who writes what")
    missing = sorted(fqn for fqn, offsets in needed if not any(p.offsets == offsets
                                                               for p in globals_.get(fqn, ("", (), []))[2]))
    if missing:
        raise DurableError(f"no rank wrote {missing[:3]} ({len(missing)} pieces)")
    return Index(first.job, first.step, first.world_size, first.run, created,
                 dict(digests),
                 {r: rec.header_xxh3 for r, rec in records.items()}, globals_)


def _overlap(pieces: list[Piece]) -> bool:
    """Whether two pieces share an element (with the volume check: whether they tile the tensor exactly).
    Pieces are sorted by their corner, so only neighbours that start before the other's end are compared."""
    ordered = sorted(pieces, key=lambda p: p.offsets)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.offsets and b.offsets[0] >= a.offsets[0] + a.box[0]:
                break
            if all(bo < ao + ab and ao < bo + bb for ao, ab, bo, bb in zip(a.offsets, a.box, b.offsets, b.box)):
                return True
    return False


def prune(job_root: Path, keep: int) -> list[int]:
    """Remove committed steps beyond the newest `keep` and unfinished steps older than the newest commit."""
    steps = []
    for child in job_root.iterdir() if job_root.is_dir() else ():
        step = layout.step_of(child.name)
        if step is not None and child.is_dir() and not child.is_symlink():
            steps.append((step, (child / layout.COMMIT).exists(), child))
    committed = sorted(step for step, done, _ in steps if done)
    if not committed:
        return []
    kept = set(committed[-keep:])
    removed = []
    for step, done, path in steps:
        if step in kept or (not done and step > committed[-1]):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(step)
    return sorted(removed)
