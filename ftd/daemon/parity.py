"""Parity chunks and rotation records in shared memory.

A parity chunk lives in `<shm>/ftd-<job>/parity/s<step>-r<rotation>-p<j>.par`. It is sealed by
its rotation record: `s<step>-r<rotation>.rec.json`, which every group member keeps. The record
holds what a rebuild needs beyond the bytes: codec, k, m, chunk and stripe size, each
contributor's chunk number, and an xxh3 checksum of every stripe of every chunk (data and
parity), so a corrupt piece is detected and not used.

The directory is private like the segments' (0700, or 0750 with FTD_SHM_GROUP), files are 0600,
nothing is opened through a symlink, and records are parsed with size and depth bounds.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import xxhash

from ftd import knobs
from ftd.errors import FtdError, ManifestError, NotFound
from ftd.manifest import parse_json

log = logging.getLogger(__name__)

_PAR_RE = re.compile(r"^s(\d+)-r(\d+)-p(\d+)\.par$")
_REC_RE = re.compile(r"^s(\d+)-r(\d+)\.rec\.json$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _open_own(path: Path, flags: int, mode: int = 0o600) -> int:
    """Open a regular file of the daemon's user, never through a symlink (OSError otherwise)."""
    fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(f"{path} is not a regular file of the daemon's user")
    return fd


def stripe_checksums(data: bytes | memoryview, stripe: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(data[i:i + stripe]) for i in range(0, len(data), stripe)]


@dataclass(frozen=True)
class RotationRecord:
    """Everything about one rotation of one protected step, except the bytes."""

    step: int
    rotation: int
    codec: str
    k: int
    m: int
    chunk_bytes: int
    stripe_bytes: int
    members: list[int]            # global node ids of the group, in order
    data: list[list[int]]         # per codec index 0..k-1: [group position, chunk number]
    parity: list[int]             # per parity j: group position
    checksums: list[list[int]]    # per codec index 0..k+m-1: stripe checksums

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RotationRecord:
        try:
            doc: dict[str, Any] = parse_json(raw, "rotation record", max_bytes=knobs.get().max_record_bytes, max_depth=8)
            rec = cls(**{k: doc[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError, ManifestError) as exc:
            raise FtdError(f"malformed rotation record: {exc}") from exc
        stripes = -(-rec.chunk_bytes // rec.stripe_bytes) if rec.stripe_bytes > 0 else -1
        if (len(rec.data) != rec.k or len(rec.parity) != rec.m or len(rec.checksums) != rec.k + rec.m
                or any(len(c) != stripes for c in rec.checksums) or rec.chunk_bytes <= 0):
            raise FtdError(f"inconsistent rotation record for step {rec.step} rotation {rec.rotation}")
        return rec


class ParityStore:
    """Parity files and rotation records of one job on this node. Thread-safe."""

    def __init__(self, root: Path, admit: Callable[[int], None] | None = None, mode: int = 0o700):
        """`admit(nbytes)` is asked before a new parity file of `nbytes` is allocated; it raises to refuse.

        `root` is the job directory (already checked by the segment store); `mode` that of its directories.
        """
        self.root = root / "parity"
        self._mode = mode
        self._make_root()
        self._lock = threading.Lock()
        self._maps: dict[tuple[int, int, int], mmap.mmap] = {}
        self._admit = admit
        self._verified: set[tuple[int, int, int]] = set()  # checked against their records
        self._written: set[tuple[int, int, int]] = set()  # written by this process: checked when the record comes

    def _make_root(self) -> None:
        """Create the parity directory privately; refuse a symlink or someone else's directory."""
        try:
            os.mkdir(self.root, self._mode)
        except FileExistsError:
            pass
        st = os.lstat(self.root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise FtdError(f"{self.root} is not a private directory of the daemon's user (a symlink, another "
                           f"owner or writable by others); remove it and start the daemon again")

    def held_bytes(self) -> int:
        """Bytes of every parity file on this node."""
        total = 0
        for name in self._names():
            if _PAR_RE.match(name):
                try:
                    total += os.lstat(self.root / name).st_size
                except FileNotFoundError:
                    continue
        return total

    def _par(self, step: int, rot: int, j: int) -> Path:
        return self.root / f"s{step}-r{rot}-p{j}.par"

    def _rec(self, step: int, rot: int) -> Path:
        return self.root / f"s{step}-r{rot}.rec.json"

    def create(self, step: int, rot: int, j: int, size: int) -> mmap.mmap:
        """A writable, pre-allocated parity file (an unsealed one is replaced)."""
        with self._lock:
            key = (step, rot, j)
            self._verified.discard(key)
            self._written.add(key)
            if key in self._maps and len(self._maps[key]) == size:
                return self._maps[key]
            path = self._par(step, rot, j)
            if self._admit is not None:
                old = self._maps.pop(key, None)
                if old is not None:
                    old.close()
                try:
                    replaced = path.stat().st_size
                except FileNotFoundError:
                    replaced = 0
                self._admit(size - replaced)
            fd = _open_own(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)
                m = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._maps[key] = m
            return m

    def write(self, step: int, rot: int, j: int, size: int, offset: int, data: memoryview | bytes) -> None:
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"parity write [{offset}, {offset + len(data)}) outside {size} bytes")
        m = self.create(step, rot, j, size)
        m[offset:offset + len(data)] = data

    def put_record(self, record: RotationRecord) -> None:
        tmp = self._rec(record.step, record.rotation).with_suffix(".tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            view = memoryview(record.to_json())
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, self._rec(record.step, record.rotation))

    def record(self, step: int, rot: int) -> RotationRecord:
        try:
            fd = _open_own(self._rec(step, rot), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise NotFound(f"no record of step {step} rotation {rot}") from None
        except OSError as exc:
            raise FtdError(f"record of step {step} rotation {rot} is unusable: {exc}") from None
        try:
            raw = os.read(fd, knobs.get().max_record_bytes + 1)
        finally:
            os.close(fd)
        return RotationRecord.from_json(raw)

    def seal(self, step: int, rot: int, j: int) -> bool:
        """Check a received parity chunk against its record; True when it is complete and intact."""
        rec = self.record(step, rot)
        path = self._par(step, rot, j)
        try:
            if os.lstat(path).st_size != rec.chunk_bytes:
                return False
        except FileNotFoundError:
            return False
        got = stripe_checksums(self._read_map(step, rot, j), rec.stripe_bytes)
        if got != rec.checksums[rec.k + j]:
            log.error("parity step %d rotation %d j %d does not match its record; dropped", step, rot, j)
            with self._lock:
                m = self._maps.pop((step, rot, j), None)
                if m is not None:
                    m.close()
            path.unlink(missing_ok=True)
            return False
        with self._lock:
            self._verified.add((step, rot, j))
        return True

    def read(self, step: int, rot: int, j: int, offset: int, length: int) -> bytes:
        """A piece of a parity chunk; raises when the file is missing or the piece fails its checksum."""
        rec = self.record(step, rot)
        if offset % rec.stripe_bytes or offset < 0 or offset + length > rec.chunk_bytes:
            raise ValueError(f"parity read [{offset}, +{length}) is not stripe-aligned within {rec.chunk_bytes}")
        data = bytes(self._read_map(step, rot, j)[offset:offset + length])
        first = offset // rec.stripe_bytes
        for i, c in enumerate(stripe_checksums(data, rec.stripe_bytes)):
            if c != rec.checksums[rec.k + j][first + i]:
                raise FtdError(f"parity step {step} rotation {rot} j {j} stripe {first + i} fails its checksum")
        return data

    def _read_map(self, step: int, rot: int, j: int) -> mmap.mmap:
        with self._lock:
            key = (step, rot, j)
            if key not in self._maps:
                path = self._par(step, rot, j)
                try:
                    fd = _open_own(path, os.O_RDWR)
                except FileNotFoundError:
                    raise NotFound(f"no parity for step {step} rotation {rot} j {j}") from None
                except OSError as exc:
                    raise FtdError(f"parity of step {step} rotation {rot} j {j} is unusable: {exc}") from None
                try:
                    self._maps[key] = mmap.mmap(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            return self._maps[key]

    def held(self) -> list[tuple[int, int, int, int]]:
        """(step, rotation, j, chunk bytes) of every parity chunk that matches its record.

        A chunk written by this process is announced once its record sealed it; one found on disk
        (a restarted daemon) is checked against its record the first time, and dropped if it fails.
        """
        out = []
        names = self._names()
        records = {(int(a), int(b)) for a, b in (_REC_RE.match(n).groups() for n in names if _REC_RE.match(n))}
        for name in names:
            path = self.root / name
            match = _PAR_RE.match(name)
            if match:
                step, rot, j = key = tuple(int(x) for x in match.groups())
                if (step, rot) not in records:
                    continue
                with self._lock:
                    verified, written = key in self._verified, key in self._written
                if not verified:
                    if written:
                        continue  # its record has not sealed it (yet)
                    try:
                        if not self.seal(step, rot, j):
                            continue
                    except (FtdError, ValueError, OSError):
                        continue
                try:
                    out.append((step, rot, j, path.stat().st_size))
                except FileNotFoundError:
                    continue
        return sorted(out)

    def _names(self) -> list[str]:
        """File names in the parity directory (recreated, with a warning, if someone removed it)."""
        try:
            return [p.name for p in self.root.iterdir()]
        except FileNotFoundError:
            log.warning("parity directory %s vanished; recreating it", self.root)
            self._make_root()
            return []

    def steps(self) -> set[int]:
        """Steps of every parity file and record on this node."""
        matches = (_PAR_RE.match(n) or _REC_RE.match(n) for n in self._names())
        return {int(m.group(1)) for m in matches if m}

    def whole_steps(self, rotations: int) -> set[int]:
        """Steps whose records of every rotation 0..rotations-1 are here: each coordinator sent its
        record after its parity, so every rotation of such a step was encoded and distributed."""
        seen: dict[int, set[int]] = {}
        for name in self._names():
            match = _REC_RE.match(name)
            if match:
                seen.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
        return {step for step, rots in seen.items() if rots >= set(range(rotations))}

    def drop_except(self, keep_steps: set[int]) -> None:
        """Delete parity and records of every step not in `keep_steps`."""
        with self._lock:
            for name in self._names():
                path = self.root / name
                match = _PAR_RE.match(name) or _REC_RE.match(name)
                if match and int(match.group(1)) not in keep_steps:
                    key = tuple(int(x) for x in match.groups())
                    m = self._maps.pop(key, None) if len(key) == 3 else None  # type: ignore[arg-type]
                    if m is not None:
                        m.close()
                    self._verified.discard(key)  # type: ignore[arg-type]
                    self._written.discard(key)  # type: ignore[arg-type]
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                m.close()
            self._maps.clear()
