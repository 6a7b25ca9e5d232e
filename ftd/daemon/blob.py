"""A node's data for one step as one byte string, the unit that erasure coding protects.

    [8-byte little-endian header length][header JSON][pad to 4 KiB][rank a's segment][pad]…

The header lists every local rank's part (rank, offset, length, its manifest JSON), so a node
rebuilt from its peers can turn the decoded bytes back into sealed per-rank segments. Reads past
the end return zeros (every node's blob is padded to the group's chunk size).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

from ftd.errors import ManifestError
from ftd.manifest import parse_json

BLOB_ALIGN = 4096
BLOB_FORMAT = 1
MAX_HEADER_BYTES = 256 << 20


def _align(n: int) -> int:
    return (n + BLOB_ALIGN - 1) // BLOB_ALIGN * BLOB_ALIGN


@dataclass(frozen=True)
class BlobPart:
    """One rank's sealed segment inside a node blob."""

    rank: int
    offset: int
    nbytes: int
    manifest_json: bytes
    path: str = ""


class NodeBlob:
    """Read-only view of a node's sealed segments of one step, laid out as a blob."""

    def __init__(self, step: int, node: int, parts: list[tuple[int, str, int, bytes]]):
        """`parts`: (rank, segment path, data bytes, manifest JSON) of every local rank."""
        entries, placed = [], []
        provisional = 0
        for rank, path, nbytes, manifest in sorted(parts):
            entries.append({"rank": rank, "offset": 0, "nbytes": nbytes, "manifest": manifest.decode()})
            placed.append((rank, path, nbytes, manifest))
        header = self._header(step, node, entries)
        offset = _align(len(header))
        while True:  # offsets change the header's length; iterate until stable
            provisional = offset
            for entry in entries:
                entry["offset"] = provisional
                provisional = _align(provisional + entry["nbytes"])
            header = self._header(step, node, entries)
            if _align(len(header)) == offset:
                break
            offset = _align(len(header))
        self.step, self.node, self.header, self.size = step, node, header, provisional
        self.parts = [BlobPart(r, e["offset"], n, m, p) for (r, p, n, m), e in zip(placed, entries)]
        self._maps: dict[str, mmap.mmap] = {}

    @staticmethod
    def _header(step: int, node: int, entries: list[dict]) -> bytes:
        body = json.dumps({"format": BLOB_FORMAT, "step": step, "node": node, "ranks": entries},
                          separators=(",", ":")).encode()
        return struct.pack("<Q", len(body)) + body

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the blob, zero past its end."""
        out = bytearray(length)
        self._fill(out, offset, 0, self.header)
        for part in self.parts:
            lo, hi = max(offset, part.offset), min(offset + length, part.offset + part.nbytes)
            if lo < hi:
                seg = self._map(part.path)
                out[lo - offset:hi - offset] = seg[lo - part.offset:hi - part.offset]
        return bytes(out)

    @staticmethod
    def _fill(out: bytearray, offset: int, start: int, data: bytes) -> None:
        lo, hi = max(offset, start), min(offset + len(out), start + len(data))
        if lo < hi:
            out[lo - offset:hi - offset] = data[lo - start:hi - start]

    def _map(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a segment path is never a link
            try:
                m = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps[path] = m
        return m

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def parse_header(buf: bytes | memoryview, total: int) -> tuple[int, int, list[BlobPart]]:
    """(step, node, parts) of a rebuilt blob of `total` bytes; ManifestError when it is not one."""
    if len(buf) < 8:
        raise ManifestError("blob too short for its header")
    (length,) = struct.unpack_from("<Q", buf, 0)
    if length > MAX_HEADER_BYTES or 8 + length > len(buf):
        raise ManifestError(f"blob header of {length} bytes does not fit")
    doc = parse_json(bytes(buf[8:8 + length]), "blob header", max_bytes=MAX_HEADER_BYTES, max_depth=8)
    try:
        if doc.get("format") != BLOB_FORMAT:
            raise ManifestError(f"unknown blob format {doc.get('format')!r}")
        parts = [BlobPart(int(e["rank"]), int(e["offset"]), int(e["nbytes"]), str(e["manifest"]).encode())
                 for e in doc["ranks"]]
        step, node = int(doc["step"]), int(doc["node"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"malformed blob header: {exc}") from exc
    for part in parts:
        if part.offset < 8 + length or part.nbytes < 0 or part.offset + part.nbytes > total:
            raise ManifestError(f"blob part of rank {part.rank} lies outside the blob")
    return step, node, parts
