"""Where the durable tier keeps a step, and the JSON documents that describe it.

    <durable_dir>/<job>/step-000000000120/
        rank-00000.safetensors   the model and optimizer pieces rank 0 writes (DCP-named, DCP_SHARDING_INFO)
        rank-00000.ftd.bin       rank 0's entries that have no checkpoint-wide name (RNG, scheduler, extra tensors)
        rank-00000.ftd.json      rank 0's sidecar: its manifest (meta: param groups, scheduler, RNG, extra as
                                 JSON), where each of its entries lies, the header's checksum
        ...
        ftd-index.json           every rank's sidecar digest and where every global piece lies
        ftd-commit.json          written last: the step is durable once it exists

Each file is written under a temporary name, fsynced and renamed; the commit marker carries the
index's checksum, the index each sidecar's, a sidecar its safetensors header's, and every
tensor's bytes are covered by the chunk checksums of the rank's manifest, so ftd verifies all of
it before it loads anything. Only JSON is ever read back (bounded, ftd.manifest.parse_json).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ftd.errors import ManifestError
from ftd.manifest import parse_json

FORMAT = 1
INDEX = "ftd-index.json"
COMMIT = "ftd-commit.json"
_STEP_RE = re.compile(r"step-(\d{12})")
MAX_SIDECAR_BYTES = 256 << 20
MAX_INDEX_BYTES = 512 << 20


def job_dir(root: str | Path, job: str) -> Path:
    return Path(root) / job


def step_dir(root: str | Path, job: str, step: int) -> Path:
    return job_dir(root, job) / f"step-{step:012d}"


def step_of(name: str) -> int | None:
    """The step a directory name stands for; None for any other name."""
    match = _STEP_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def tensors_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def raw_file(rank: int) -> str:
    return f"rank-{rank:05d}.ftd.bin"


def sidecar_file(rank: int) -> str:
    return f"rank-{rank:05d}.ftd.json"


def digest(doc: dict[str, Any]) -> str:
    """xxh3-64 (hex) of the canonical JSON of `doc` without its "xxh3" field."""
    body = {k: v for k, v in doc.items() if k != "xxh3"}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def sealed(doc: dict[str, Any]) -> bytes:
    """`doc` with its digest, as bytes to write."""
    doc = dict(doc, xxh3=digest(doc))
    return json.dumps(doc, separators=(",", ":")).encode()


def unsealed(raw: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    """Parse a document written by `sealed`, checking its format and digest; ManifestError otherwise."""
    doc = parse_json(raw, what, max_bytes=max_bytes)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{what} is not a format-{FORMAT} ftd durable document")
    if doc.get("xxh3") != digest(doc):
        raise ManifestError(f"{what} checksum mismatch: edited or corrupted after it was written")
    return doc


Span = tuple[int, int]


@dataclass(frozen=True)
class RankRecord:
    """A rank's sidecar: its manifest and where the entries it wrote lie (absolute [begin, end) in each file)."""

    job: str
    step: int
    rank: int
    world_size: int
    run: str
    manifest_json: bytes
    tensors: dict[str, Span] = field(default_factory=dict)  # entry name -> span in rank-R.safetensors
    raw: dict[str, Span] = field(default_factory=dict)  # entry name -> span in rank-R.ftd.bin
    header_xxh3: str = ""
    tensors_bytes: int = 0
    raw_bytes: int = 0

    def to_bytes(self) -> bytes:
        return sealed({"format": FORMAT, "job": self.job, "step": self.step, "rank": self.rank,
                       "world_size": self.world_size, "run": self.run, "manifest": self.manifest_json.decode(),
                       "tensors": {k: list(v) for k, v in self.tensors.items()},
                       "raw": {k: list(v) for k, v in self.raw.items()}, "header_xxh3": self.header_xxh3,
                       "tensors_bytes": self.tensors_bytes, "raw_bytes": self.raw_bytes})

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> RankRecord:
        doc = unsealed(raw, what, MAX_SIDECAR_BYTES)
        try:
            ints = {k: doc[k] for k in ("step", "rank", "world_size", "tensors_bytes", "raw_bytes")}
            if any(type(v) is not int or v < 0 for v in ints.values()):
                raise ValueError(f"negative or non-integer field in {ints}")
            spans = {k: _spans(doc[k], doc[f"{k}_bytes"]) for k in ("tensors", "raw")}
            if not all(isinstance(doc[k], str) for k in ("job", "run", "manifest", "header_xxh3")):
                raise ValueError("job, run, manifest and header_xxh3 must be text")
            return cls(doc["job"], manifest_json=doc["manifest"].encode(), run=doc["run"],
                       header_xxh3=doc["header_xxh3"], **ints, **spans)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{what} is malformed: {exc}") from None


def _spans(doc: Any, limit: int) -> dict[str, Span]:
    if not isinstance(doc, dict):
        raise ValueError("spans must be an object")
    out = {}
    for name, span in doc.items():
        if (not isinstance(span, list) or len(span) != 2 or any(type(x) is not int for x in span)
                or not 0 <= span[0] <= span[1] <= limit):
            raise ValueError(f"span of {name!r} is {span!r:.80}, outside the file's {limit} bytes")
        out[name] = (span[0], span[1])
    return out


@dataclass(frozen=True)
class Piece:
    """Where one box of a global tensor lies: the rank whose safetensors file holds it and its span there."""

    offsets: tuple[int, ...]
    box: tuple[int, ...]
    rank: int
    span: Span


@dataclass(frozen=True)
class Index:
    """A step's index: who wrote it, each rank's sidecar digest, and every global tensor's pieces."""

    job: str
    step: int
    world_size: int
    run: str
    created_at: float
    sidecars: dict[int, str]  # rank -> its sidecar's digest
    headers: dict[int, str]  # rank -> its safetensors header's digest
    globals: dict[str, tuple[str, tuple[int, ...], list[Piece]]]  # fqn -> (dtype, global shape, pieces)

    def to_bytes(self) -> bytes:
        return sealed({
            "format": FORMAT, "job": self.job, "step": self.step, "world_size": self.world_size, "run": self.run,
            "created_at": self.created_at, "sidecars": {str(r): d for r, d in self.sidecars.items()},
            "headers": {str(r): d for r, d in self.headers.items()},
            "globals": {fqn: {"dtype": dtype, "shape": list(shape),
                              "pieces": [[list(p.offsets), list(p.box), p.rank, list(p.span)] for p in pieces]}
                        for fqn, (dtype, shape, pieces) in self.globals.items()}})

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> Index:
        doc = unsealed(raw, what, MAX_INDEX_BYTES)
        try:
            globals_: dict[str, tuple[str, tuple[int, ...], list[Piece]]] = {}
            for fqn, g in doc["globals"].items():
                pieces = [Piece(tuple(o), tuple(b), int(r), (int(s[0]), int(s[1]))) for o, b, r, s in g["pieces"]]
                globals_[fqn] = (str(g["dtype"]), tuple(int(d) for d in g["shape"]), pieces)
            return cls(str(doc["job"]), int(doc["step"]), int(doc["world_size"]), str(doc["run"]),
                       float(doc["created_at"]), {int(r): str(d) for r, d in doc["sidecars"].items()},
                       {int(r): str(d) for r, d in doc["headers"].items()}, globals_)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{what} is malformed: {exc}") from None

    def find(self, fqn: str, offsets: tuple[int, ...]) -> Piece | None:
        entry = self.globals.get(fqn)
        return next((p for p in entry[2] if p.offsets == offsets), None) if entry else None
