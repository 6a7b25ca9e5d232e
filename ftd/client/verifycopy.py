"""Verified reads of a sealed segment: each piece is checksummed while it is hot in cache, on several threads.

A restore reads a snapshot's bytes through the segment's read-only mapping (its pages faulted in
on the way; the file's size is checked first, so a truncated file is SnapshotCorrupt, not SIGBUS),
in two passes:

* `verify` (before the ranks agree, nothing live written): every chunk of every entry is hashed
  and its xxh3-64 compared with the manifest's. An entry bound for private memory the restore
  allocated itself (`into`: a fresh optimizer's state) is copied into it and hashed there: its
  verify is its copy. Every other entry is hashed in the mapping itself; nothing is staged.
* `load` (after the agreement): live destinations (parameters, an existing optimizer state) get
  their bytes copied straight in and checksummed again where they landed, so bytes that changed
  between the passes are caught too (SnapshotCorrupt: an apply failure, which restore handles).

NumPy's copy and xxh3 of large buffers release the GIL, so the chunks are spread over `threads`
workers. A chunk is handled in pieces of PIECE_BYTES (streaming xxh3 gives the one-shot digest),
each piece hashed right after it is copied, while it is hot in cache.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from torch.autograd.graph import increment_version

from ftd.client.segments import MappedSegment, torch_dtype
from ftd.errors import SnapshotCorrupt
from ftd.manifest import Entry, Manifest

log = logging.getLogger(__name__)

PIECE_BYTES = 1 << 20  # copied and hashed at once: stays in a core's cache between the two
MAX_THREADS = 8
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc: ctypes.CDLL | None | bool = None


def default_threads() -> int:
    """Worker threads of a verified read: the CPUs this process may use, at most MAX_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _madvise() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.madvise.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def prefault(tensors: Iterable[torch.Tensor], threads: int | None = None) -> bool:
    """Fault in the pages of new CPU tensors now (MADV_POPULATE_WRITE, spread over threads), so that
    allocating them is paid, and timed, apart from reading into them. False where the kernel
    refuses (the pages are then faulted in by the first write, as usual)."""
    lib = _madvise()
    ranges = []
    for t in tensors:
        n = t.numel() * t.element_size()
        if t.device.type == "cpu" and n >= mmap.PAGESIZE:
            start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
            ranges.append((start, t.data_ptr() + n - start))
    if lib is None or not ranges:
        return lib is not None

    def one(r: tuple[int, int]) -> bool:
        return lib.madvise(r[0], r[1], _MADV_POPULATE_WRITE) == 0

    workers = max(1, min(threads or default_threads(), len(ranges)))
    if workers == 1:
        ok = all([one(r) for r in ranges])
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftd-prefault") as pool:
            ok = all(list(pool.map(one, ranges)))
    if not ok:
        log.debug("MADV_POPULATE_WRITE refused; the pages are faulted in by the first write")
    return ok


@dataclass(frozen=True)
class _Chunk:
    entry: Entry
    index: int  # the chunk's number within its entry (its checksum's index)
    start: int  # byte offset within the entry
    nbytes: int


def _chunks(manifest: Manifest, entries: Iterable[Entry]) -> Iterator[_Chunk]:
    size = manifest.chunk_bytes
    for e in entries:
        for i, start in enumerate(range(0, e.nbytes, size)):
            yield _Chunk(e, i, start, min(size, e.nbytes - start))


def host_bytes(tensor: torch.Tensor, entry: Entry) -> memoryview | None:
    """A writable byte view of `tensor`'s memory when it is a CPU tensor laid out exactly as `entry`; else None."""
    try:
        dtype = torch_dtype(entry.dtype)
    except SnapshotCorrupt:
        return None
    if (tensor.device.type != "cpu" or tensor.layout is not torch.strided or not tensor.is_contiguous()
            or tensor.dtype != dtype or tuple(tensor.shape) != entry.shape or tensor.is_conj() or tensor.is_neg()
            or tensor.numel() * tensor.element_size() != entry.nbytes):
        return None
    if entry.nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


class _Pass:
    """One pass over a set of chunks; the first mismatch stops the others and is raised."""

    def __init__(self, segment: MappedSegment, manifest: Manifest, dests: Mapping[str, memoryview],
                 after_copy: bool):
        self.segment, self.manifest, self.dests, self.after_copy = segment, manifest, dests, after_copy
        self.failed = threading.Event()
        segment.check_size()
        mapped = segment.memoryview()
        self.src = np.frombuffer(mapped, dtype=np.uint8) if len(mapped) else np.empty(0, np.uint8)

    def chunk(self, c: _Chunk) -> None:
        if self.failed.is_set():
            return
        dest = self.dests.get(c.entry.name)
        digest = xxhash.xxh3_64()
        base = c.entry.offset + c.start
        done = 0
        while done < c.nbytes:
            n = min(PIECE_BYTES, c.nbytes - done)
            src = self.src[base + done:base + done + n]
            if dest is not None:  # copy, then hash the copy while it is hot in cache
                piece = dest[c.start + done:c.start + done + n]
                np.copyto(np.frombuffer(piece, dtype=np.uint8), src)
                digest.update(piece)
            else:  # hash the mapping itself: its pages are faulted in on the way, nothing is copied
                digest.update(src)
            done += n
        if digest.intdigest() != c.entry.checksums[c.index]:
            self.failed.set()
            what = "changed after it was verified: " if self.after_copy else ""
            raise SnapshotCorrupt(f"{what}checksum mismatch in chunk {c.index} (bytes {base}+)",
                                  rank=self.manifest.rank, step=self.manifest.step, entry=c.entry.name)

    def run(self, chunks: list[_Chunk], threads: int) -> None:
        workers = max(1, min(threads, len(chunks)))
        if workers == 1:
            for c in chunks:
                self.chunk(c)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftd-verify") as pool:
            futures = [pool.submit(self.chunk, c) for c in chunks]
            errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first


def verify(segment: MappedSegment, manifest: Manifest, into: Mapping[str, torch.Tensor] | None = None,
           threads: int | None = None) -> None:
    """Check every chunk of every entry; fill `into`'s tensors (private, laid out as their entries) on the way.

    SnapshotCorrupt on the first mismatch (the content of `into` is then undefined); ValueError when
    a tensor of `into` cannot be read into (restore allocates them to fit).
    """
    entries = _entries(manifest)
    dests = {}
    for name, tensor in (into or {}).items():
        entry = entries.get(name)
        view = host_bytes(tensor, entry) if entry is not None else None
        if view is None:
            raise ValueError(f"cannot read entry {name!r} into a {tensor.dtype}{list(tensor.shape)} on {tensor.device}")
        dests[name] = view
    _Pass(segment, manifest, dests, after_copy=False).run(list(_chunks(manifest, manifest.entries)),
                                                          threads or default_threads())


def load(segment: MappedSegment, manifest: Manifest, targets: Mapping[str, torch.Tensor],
         threads: int | None = None) -> set[str]:
    """Read the entries of `targets` straight into those (live) tensors, checking every chunk where it landed.

    Only CPU tensors laid out exactly as their entry are read into; the names read are returned
    (the others are left to a copy from the mapping). SnapshotCorrupt when a chunk's bytes no
    longer match the manifest (then the tensors hold part of the snapshot).
    """
    entries = _entries(manifest)
    dests = {}
    for name, tensor in targets.items():
        entry = entries.get(name)
        view = host_bytes(tensor, entry) if entry is not None else None
        if view is not None:
            dests[name] = view
    chosen = [entries[name] for name in dests]
    try:
        _Pass(segment, manifest, dests, after_copy=True).run(list(_chunks(manifest, chosen)),
                                                             threads or default_threads())
    finally:
        for name in dests:  # written behind autograd's back: what an in-place copy_ would have counted
            increment_version(targets[name])
    return set(dests)


def _entries(manifest: Manifest) -> dict[str, Entry]:
    return manifest.entry_map()
