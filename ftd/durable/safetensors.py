"""The safetensors header: 8 bytes of little-endian length, then JSON naming each tensor's dtype,
shape and `[begin, end)` in the data that follows, packed without holes.

ftd writes the header itself (the daemon needs neither torch nor the safetensors package) and
reads it back with the bounded JSON parser. The `__metadata__` object carries DCP's sharding
information (`DCP_SHARDING_INFO`: each tensor's `saved_offsets` in its global tensor), which is
what `torch.distributed.checkpoint.HuggingFaceStorageReader` reads to load the file onto any
world size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from ftd.errors import ManifestError
from ftd.manifest import parse_json

# torch's dtype names -> safetensors'. Other dtypes (complex32, uint-less float8 variants) stay out of
# the safetensors files and travel in the rank's raw side file only.
DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32",
    "int64": "I64", "uint64": "U64", "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
SHARDING_KEY = "DCP_SHARDING_INFO"
MAX_HEADER_BYTES = 100 << 20  # what the safetensors library itself accepts


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: its key, dtype (torch's name), shape, global offsets and bytes."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int


def header(tensors: list[Tensor], extra: dict[str, str] | None = None,
           sharding: bool = True) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included, padded to 8 bytes) and each key's [begin, end) in the data.

    `sharding=False` leaves DCP's entries out of `__metadata__` (a plain weights file)."""
    doc: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    at = 0
    for t in tensors:
        spans[t.key] = (at, at + t.nbytes)
        doc[t.key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        at += t.nbytes
    meta = {"format": "pt"}
    if sharding:
        meta.update({"DCP_VERSION": "1.0",
                     SHARDING_KEY: json.dumps({t.key: {"saved_offsets": list(t.offsets)} for t in tensors},
                                              separators=(",", ":"))})
    meta.update(extra or {})
    doc["__metadata__"] = meta
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body, spans


def read_header(raw: bytes, file_bytes: int) -> tuple[int, dict[str, tuple[int, int]]]:
    """(data start, key -> absolute [begin, end)) of a header whose first bytes are `raw`; ManifestError if bad."""
    if len(raw) < 8:
        raise ManifestError("safetensors file is shorter than its length prefix")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(raw):
        raise ManifestError(f"safetensors header of {length} bytes is larger than the limit or the file")
    doc = parse_json(raw[8:8 + length], "safetensors header")
    if not isinstance(doc, dict):
        raise ManifestError("safetensors header is not an object")
    start, spans = 8 + length, {}
    for key, value in doc.items():
        if key == "__metadata__":
            continue
        offsets = value.get("data_offsets") if isinstance(value, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or start + offsets[1] > file_bytes):
            raise ManifestError(f"safetensors tensor {key!r}: bad data_offsets {offsets!r:.100}")
        spans[key] = (start + offsets[0], start + offsets[1])
    return start, spans
