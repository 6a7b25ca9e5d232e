"""The snapshot format both sides speak: entries, offsets, dtypes and per-chunk checksums.

A rank's snapshot is one contiguous byte region (a shared-memory segment) plus a manifest.
The manifest is JSON, never pickle: it names every tensor entry (kind, dtype, shape, byte
offset, length, one xxh3-64 checksum per `chunk_bytes` of the entry) and carries the
non-tensor state (`meta`, JSON-safe; see ftd/client/state.py), the seal time (`created_at`), the run
identity of the launch that took it (`run`), the training metrics the trainer recorded with the
step (`metrics`: a few named numbers such as the loss, absent when none; see `check_metrics`)
and `manifest_xxh3`, an xxh3-64 over the canonical form of everything else (meta included),
so an edited or torn manifest is refused, not restored. Everything read back is validated
before use — size and nesting depth bounded (checked iteratively), every tensor reference
in `meta` naming an entry at most once — so a corrupt or hostile manifest gives a
ManifestError, not a crash or a memory blow-up. The checksum detects corruption and edits;
it is no signature (anyone who can write the file can recompute it): who may write the shm
tree is the daemon's job.
"""

from __future__ import annotations

import json
import marshal
import math
import re
import secrets
import threading
from itertools import chain
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ftd.errors import ManifestError, SnapshotCorrupt

FORMAT_VERSION = 3  # 2: manifest_xxh3 over the whole manifest, created_at; 3: entries' global placement
READABLE_FORMATS = (2, 3)  # a format-2 snapshot restores as before; it has no placements, so it is never persisted
MAX_FQN_CHARS = 4096
ALIGN = 64
CHECKSUM_ALGO = "xxh3_64"
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 64  # nesting of objects and arrays in any manifest (meta values: see jsonsafe.MAX_DEPTH)
DIGEST_KEY = "manifest_xxh3"
KINDS = ("param", "buffer", "optim", "rng", "extra")
MAX_METRICS = 64  # named numbers a snapshot may record (`snapshot(step, metrics=...)`)
MAX_METRIC_NAME = 128
# Bytes per element of every dtype a snapshot may hold (torch's names; no torch import needed here,
# so the daemon starts fast).
DTYPE_SIZES = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}


def itemsize(dtype: str) -> int:
    """Bytes per element of the dtype called `dtype`; ManifestError for anything else."""
    size = DTYPE_SIZES.get(dtype) if isinstance(dtype, str) else None
    if size is None:
        raise ManifestError(f"unsupported dtype {dtype!r}")
    return size


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Placement:
    """Where an entry lies in a checkpoint-wide tensor, as torch.distributed.checkpoint names and shards it.

    `fqn` is the flattened state-dict name ("model.fc.weight", "optim.state.fc.weight.exp_avg"),
    `shape` the global shape, `offsets` and `box` the corner and extent of the piece this entry
    holds (row-major; `box` has as many elements as the entry). `write`: this rank writes the
    piece to the durable tier; among ranks holding the same piece (replicas) exactly one does.
    """

    fqn: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    box: tuple[int, ...]
    write: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"fqn": self.fqn, "shape": list(self.shape), "offsets": list(self.offsets), "box": list(self.box),
                "write": self.write}

    @classmethod
    def from_json(cls, doc: Any, numel: int) -> Placement:
        """Parse and check a placement of an entry of `numel` elements; ManifestError when malformed."""
        if not isinstance(doc, dict):
            raise ManifestError("placement is not an object")
        fqn, write = doc.get("fqn"), doc.get("write")
        if not isinstance(fqn, str) or not 0 < len(fqn) <= MAX_FQN_CHARS or not isinstance(write, bool):
            raise ManifestError(f"placement needs a name of 1..{MAX_FQN_CHARS} characters and a write flag")
        dims = []
        for key in ("shape", "offsets", "box"):
            value = doc.get(key)
            if not isinstance(value, list) or len(value) > 64 or not _naturals(value):
                raise ManifestError(f"placement {key} must be at most 64 non-negative integers")
            dims.append(tuple(value))
        shape, offsets, box = dims
        if not len(shape) == len(offsets) == len(box):
            raise ManifestError(f"placement of {fqn}: shape, offsets and box differ in rank")
        if any(o + b > s for o, b, s in zip(offsets, box, shape)):
            raise ManifestError(f"placement of {fqn}: box {list(box)} at {list(offsets)} exceeds {list(shape)}")
        if math.prod(box) != numel:
            raise ManifestError(f"placement of {fqn}: box {list(box)} does not hold the entry's {numel} elements")
        return cls(fqn, shape, offsets, box, write)


@dataclass(frozen=True)
class EntrySpec:
    """A tensor to place in a segment, before it has an offset. `dtype` is torch's name ("float32")."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    placement: Placement | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class Entry:
    """A tensor placed in a segment."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksums: tuple[int, ...] = ()
    placement: Placement | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape),
               "offset": self.offset, "nbytes": self.nbytes, "checksums": list(self.checksums)}
        if self.placement is not None:
            doc["global"] = self.placement.to_json()
        return doc

    def json_pieces(self) -> tuple[str, str]:
        """This entry's JSON text (as in a manifest) before and after its checksums' digits: a writer that
        lays out the same entries every step renders only the checksums (`render_entries`)."""
        text = json.dumps({**self.to_json(), "checksums": []}, separators=(",", ":"))
        # the key's quotes are unescaped, so the name (an escaped JSON string before it) cannot hold this text
        head, _, tail = text.partition('"checksums":[]')
        return head + '"checksums":[', "]" + tail


def entries_template(pieces: Sequence[tuple[str, str]]) -> str:
    """The JSON array of a manifest's entries as one %-format string: each entry's `Entry.json_pieces` around
    a %s where its checksums go (see `render_entries`)."""
    return "[" + ",".join(head.replace("%", "%%") + "%s" + tail.replace("%", "%%") for head, tail in pieces) + "]"


def render_entries(template: str, checksums: Sequence[Sequence[int]]) -> str:
    """The entries' JSON text: `template` (entries_template) with each entry's checksums, in order."""
    return template % tuple([str(sums[0]) if len(sums) == 1 else ",".join(map(str, sums)) for sums in checksums])


def layout(specs: Iterable[EntrySpec]) -> tuple[list[Entry], int]:
    """Place entries one after another, each aligned to ALIGN bytes; return them and the total size."""
    entries, offset = [], 0
    for spec in specs:
        entries.append(Entry(spec.name, spec.kind, spec.dtype, tuple(spec.shape), offset, spec.nbytes,
                             placement=spec.placement))
        offset = align_up(offset + spec.nbytes)
    return entries, offset


def chunk_checksums(data: memoryview, chunk_bytes: int) -> tuple[int, ...]:
    """xxh3-64 of each `chunk_bytes` slice of `data` (the last one may be shorter)."""
    return tuple(xxhash.xxh3_64_intdigest(data[i:i + chunk_bytes]) for i in range(0, len(data), chunk_bytes))


@dataclass(frozen=True)
class Manifest:
    """Everything needed to read one rank's snapshot of one step back."""

    job: str
    rank: int
    world_size: int
    step: int
    chunk_bytes: int
    data_bytes: int
    entries: tuple[Entry, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0  # seal time, seconds since the epoch (the client's clock at Commit)
    run: str = ""  # the launch's run identity (ClientConfig.run); "" when the launcher gave none
    metrics: dict[str, float] = field(default_factory=dict)  # what the trainer recorded with the step (check_metrics)
    checksum: str = CHECKSUM_ALGO
    format: int = FORMAT_VERSION

    def to_json(self, entries_json: str | None = None) -> bytes:
        """The manifest's text. `entries_json`: its entries already rendered (`render_entries`), used in place
        of `self.entries` (whose checksums may then be left empty)."""
        head = {"format": self.format, "job": self.job, "rank": self.rank, "world_size": self.world_size,
                "step": self.step, "chunk_bytes": self.chunk_bytes, "data_bytes": self.data_bytes,
                "created_at": self.created_at, "run": self.run, "checksum": self.checksum}
        compact = {"separators": (",", ":"), "allow_nan": True}
        if entries_json is None:
            entries_json = json.dumps([e.to_json() for e in self.entries], **compact)  # type: ignore[arg-type]
        # The body is written once, in its own key order (meta's dicts come back in the order they were
        # captured), and the digest covers that text; it is spliced in last (see _spliced_digest_matches).
        # It is the text of one object: the head's fields, "entries", "meta" and (when any) "metrics".
        text = '%s,"entries":%s,"meta":%s' % (json.dumps(head, **compact)[:-1],  # type: ignore[arg-type]
                                               entries_json, json.dumps(self.meta, **compact))  # type: ignore[arg-type]
        if self.metrics:  # absent when none: a manifest without metrics reads as it always did
            text += ',"metrics":' + json.dumps(dict(self.metrics), **compact)  # type: ignore[arg-type]
        body = (text + "}").encode()
        return b"%s,\"%s\":\"%s\"}" % (body[:-1], DIGEST_KEY.encode(), xxhash.xxh3_64_hexdigest(body).encode())

    @classmethod
    def from_json(cls, raw: bytes, cache: EntryCache | None = None) -> Manifest:
        """Parse, integrity-check and type-check a manifest; ManifestError on anything malformed.

        With `cache`, entries laid out as in the last manifest parsed through it reuse its checked entries
        (their checksums are checked anew): the daemon's Commit of a rank's next step, see EntryCache.
        """
        parsed = cache.parse(raw) if cache is not None else None
        doc = parsed[0] if parsed is not None else parse_json(raw, "manifest")
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a JSON object")
        if type(doc.get("format")) is not int or doc["format"] not in READABLE_FORMATS:
            raise ManifestError(f"unsupported manifest format {doc.get('format')!r}: this ftd reads formats "
                                f"{', '.join(map(str, READABLE_FORMATS))} (snapshots of another ftd version are not "
                                "restored; training starts from the previous or a fresh step)")
        digest = doc.pop(DIGEST_KEY, None)
        if not isinstance(digest, str):
            raise ManifestError(f"manifest has no {DIGEST_KEY} checksum")
        if not _spliced_digest_matches(raw, digest) and digest != manifest_digest(doc):
            raise ManifestError("manifest checksum mismatch: the manifest was edited or corrupted after it was sealed")
        if doc.get("checksum") != CHECKSUM_ALGO:
            raise ManifestError(f"unsupported checksum {doc.get('checksum')!r}")
        job = _typed(doc, "job", str)
        ints = {k: _typed(doc, k, int) for k in ("rank", "world_size", "step", "chunk_bytes", "data_bytes")}
        if min(ints.values()) < 0 or ints["chunk_bytes"] <= 0:
            raise ManifestError(f"negative or zero field in manifest: {ints}")
        created_at = doc.get("created_at")
        if type(created_at) not in (int, float) or not math.isfinite(created_at):
            raise ManifestError(f"manifest field 'created_at' must be a finite number, got {created_at!r}")
        run = doc.get("run", "")
        if not isinstance(run, str) or len(run) > 128:
            raise ManifestError(f"manifest field 'run' must be text of at most 128 characters, got {run!r:.200}")
        try:
            metrics = check_metrics(doc.get("metrics", {}))
        except ValueError as exc:
            raise ManifestError(f"manifest field 'metrics': {exc}") from None
        meta = _typed(doc, "meta", dict)
        if parsed is not None:
            entries = parsed[1]
        else:
            raw_entries = _typed(doc, "entries", list)
            entries = cache.entries(raw_entries) if cache is not None else _entries_from_json(raw_entries)
        sharded = meta.get("sharding", {}).get("tensors", {}) if isinstance(meta.get("sharding"), dict) else {}
        check_tensor_refs(meta, {e.name for e in entries} | (set(sharded) if isinstance(sharded, dict) else set()))
        if doc["format"] < 3 and any(e.placement is not None for e in entries):
            raise ManifestError("a format-2 manifest cannot carry placements")
        return cls(job=job, entries=entries, meta=meta, created_at=float(created_at), run=run, metrics=metrics,
                   format=doc["format"], **ints)

    def validate(self, capacity: int) -> None:
        """Check that every entry is self-consistent and lies inside a segment of `capacity` bytes."""
        if self.data_bytes > capacity:
            raise ManifestError(f"manifest covers {self.data_bytes} bytes but the segment holds {capacity}",
                                rank=self.rank, step=self.step)
        seen: set[str] = set()
        for e in self.entries:
            if e.name in seen:
                raise ManifestError("duplicate entry", rank=self.rank, step=self.step, entry=e.name)
            seen.add(e.name)
            if e.kind not in KINDS:
                raise ManifestError(f"unknown kind {e.kind!r}", rank=self.rank, step=self.step, entry=e.name)
            expected = math.prod(e.shape) * itemsize(e.dtype)
            if e.nbytes != expected:
                raise ManifestError(f"nbytes {e.nbytes} does not match {e.dtype}{list(e.shape)} ({expected})",
                                    rank=self.rank, step=self.step, entry=e.name)
            if e.offset % ALIGN or e.offset + e.nbytes > self.data_bytes:
                raise ManifestError(f"bytes [{e.offset}, {e.offset + e.nbytes}) lie outside the segment's "
                                    f"{self.data_bytes} bytes or are misaligned",
                                    rank=self.rank, step=self.step, entry=e.name)
            if len(e.checksums) != math.ceil(e.nbytes / self.chunk_bytes):
                raise ManifestError(f"{len(e.checksums)} checksums for {e.nbytes} bytes in chunks of {self.chunk_bytes}",
                                    rank=self.rank, step=self.step, entry=e.name)

    def verify(self, data: memoryview, names: Sequence[str] | None = None) -> None:
        """Recompute the checksums of `data` (the segment) and raise SnapshotCorrupt on the first mismatch."""
        wanted = None if names is None else set(names)
        for e in self.entries:
            if wanted is not None and e.name not in wanted:
                continue
            got = chunk_checksums(data[e.offset:e.offset + e.nbytes], self.chunk_bytes)
            if got != e.checksums:
                bad = next((i for i, (a, b) in enumerate(zip(got, e.checksums)) if a != b),
                           min(len(got), len(e.checksums)))
                raise SnapshotCorrupt(f"checksum mismatch in chunk {bad} (bytes {e.offset + bad * self.chunk_bytes}+)",
                                      rank=self.rank, step=self.step, entry=e.name)

    def entry_map(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}


def check_metrics(metrics: Any) -> dict[str, float]:
    """The metrics a snapshot records, checked: a JSON object of at most MAX_METRICS names (printable text of
    1..MAX_METRIC_NAME characters) to numbers (ints become floats; NaN and ±inf are kept, JSON-encoded as the
    manifest encodes them). ValueError naming the first problem."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{len(metrics)} metrics exceed the limit of {MAX_METRICS}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME or not name.isprintable():
            raise ValueError(f"metric name {name!r:.80} must be printable text of 1..{MAX_METRIC_NAME} characters")
        if type(value) not in (int, float):
            raise ValueError(f"metric {name!r} must be a number, got {type(value).__name__}")
        out[name] = float(value)
    return out


def manifest_digest(doc: dict[str, Any]) -> str:
    """xxh3-64 (hex) of the canonical JSON of `doc` (sorted keys, no spaces), DIGEST_KEY left out: the digest
    of manifests written before the body text itself was digested, and of hand-made ones (still accepted)."""
    body = {k: v for k, v in doc.items() if k != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return xxhash.xxh3_64_hexdigest(canonical)


def _spliced_digest_matches(raw: bytes | str, digest: str) -> bool:
    """The digest covers `raw` itself: raw is a body with the digest spliced in last (as `to_json` writes it).
    Anything else (an older, canonical digest) takes the full check."""
    if not isinstance(raw, (bytes, bytearray)):
        return False
    tail = b',"%s":"%s"}' % (DIGEST_KEY.encode(), digest.encode())
    if not raw.endswith(tail):
        return False
    return xxhash.xxh3_64_hexdigest(memoryview(raw)[:len(raw) - len(tail)].tobytes() + b"}") == digest


def parse_json(raw: bytes | str, what: str, max_bytes: int = MAX_MANIFEST_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with a size bound before and a nesting-depth bound after (checked without recursion).

    Anything too large, too deep (RecursionError in the parser included) or not JSON is a
    ManifestError naming `what`.
    """
    if len(raw) > max_bytes:
        raise ManifestError(f"{what} of {len(raw)} bytes exceeds the limit of {max_bytes}")
    if isinstance(raw, (bytes, bytearray)) and raw_depth(raw, max_depth) > max_depth:
        raise ManifestError(f"{what} is nested deeper than {max_depth} levels")
    try:
        doc = json.loads(raw)
    except RecursionError as exc:
        raise ManifestError(f"{what} is nested deeper than {max_depth} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(raw, (bytes, bytearray)) and json_depth(doc, max_depth) > max_depth:
        raise ManifestError(f"{what} is nested deeper than {max_depth} levels")
    return doc


_EMPTY_CONTAINER = re.compile(rb"\[\]|\{\}")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')


def raw_depth(raw: bytes | bytearray, stop_above: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of the JSON text `raw` (what `json_depth` gives for its parse), without parsing it.

    Escaped backslashes, then escaped quotes go (so every quote left delimits a string), everything
    but brackets and quotes is dropped (C speed); then, in slices of DEPTH_SLICE (vectorised), the
    brackets outside strings are counted up and down and the highest count kept. Stops once above
    `stop_above`. For text that is not JSON the figure means nothing (the parser refuses that text).
    """
    import numpy as np  # here: the daemon has it loaded, and a manifest module without it starts fast

    text = bytes(raw)
    if b"\\" in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = text.translate(None, _NOT_STRUCTURE)
    depth = deepest = quotes = 0
    for start in range(0, len(kept), DEPTH_SLICE):
        a = np.frombuffer(kept, np.uint8, min(DEPTH_SLICE, len(kept) - start), start)
        quote = a == 34
        outside = (((np.cumsum(quote, dtype=np.int64) + quotes) & 1) == 0) & ~quote
        quotes += int(quote.sum())
        steps = (((a == 91) | (a == 123)).astype(np.int8) - ((a == 93) | (a == 125))) * outside
        levels = np.cumsum(steps, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if deepest > stop_above:
            break
    return min(deepest, stop_above + 1)  # as json_depth, which stops one level above


DEPTH_SLICE = 1 << 20  # bytes of brackets and quotes `raw_depth` counts at once (bounds its memory)


def json_depth(doc: Any, stop_above: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), walked iteratively; stops once above `stop_above`."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_above:
            return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_tensor_refs(meta: Any, names: set[str]) -> None:
    """Every `{"__tensor__": name}` in `meta` is one of `names` (the entries, and the sharded tensors
    gathered from replicas), and none is referenced twice, so decoding cannot amplify memory."""
    seen: set[str] = set()
    stack = [meta]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if len(value) == 1 and "__tensor__" in value:
                name = value["__tensor__"]
                if not isinstance(name, str) or name not in names:
                    raise ManifestError(f"meta references tensor {name!r}, which is not an entry")
                if name in seen:
                    raise ManifestError(f"meta references tensor {name!r} more than once")
                seen.add(name)
                continue
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _typed(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"manifest field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


_INT_ONLY = {int}


def _naturals(values: list[Any]) -> bool:
    """Every item is an int (not a bool) >= 0; checked at C speed (a manifest has thousands of them)."""
    return not values or (set(map(type, values)) == _INT_ONLY and min(values) >= 0)


def _entries_from_json(raw: list[Any]) -> tuple[Entry, ...]:
    return tuple(_entry_from_json(e, i) for i, e in enumerate(raw))


_NO_SUMS: Any = object()  # an entry without checksums (never a list: the full check refuses it)


class EntryCache:
    """The entries of the last manifest parsed through it, for the next one that lays out the same tensors.

    A training run's manifests differ from step to step in their checksums (and meta), rarely in their
    entries' names, kinds, dtypes, shapes, offsets and placements. Two ways to reuse the last one's checked
    entries, each exact (anything else takes the full check, whose errors are the same):

    - `parse`: the manifest's entries are the text this ftd writes for those entries (`Entry.json_pieces`)
      but for the checksums' digits, matched as one pattern where the top-level "entries" array starts;
      only the rest of the manifest is parsed as JSON, with that array replaced by a value no manifest
      can hold (a random key of this cache), which must come back as the top-level "entries";
    - `entries`: the entries parsed as JSON are compared with the last ones as typed values (their
      marshal form, so 1, 1.0 and true differ).

    Either way only the checksums are checked anew (as `_entry_from_json` checks them). Thread-safe: what
    is remembered is replaced as a whole.
    """

    def __init__(self) -> None:
        self._last: tuple[bytes, tuple[Entry, ...]] | None = None
        self._text: tuple[re.Pattern[bytes], tuple[Entry, ...]] | None = None
        self._stand_in = "ftd-entries-" + secrets.token_hex(16)
        self._stand_in_json = json.dumps(self._stand_in).encode()
        self._lock = threading.Lock()

    def parse(self, raw: bytes) -> tuple[Any, tuple[Entry, ...]] | None:
        """(the manifest's JSON with "entries" standing in, its entries) when its entries' text is the last
        ones' but for the checksums and the rest parses; None when not (then the full check decides)."""
        text = self._text
        if text is None or not isinstance(raw, bytes) or len(raw) > MAX_MANIFEST_BYTES:
            return None
        start = raw.find(b'"entries":[')
        if start < 0:
            return None
        start += len(b'"entries":')
        match = text[0].match(raw, start)
        if match is None:
            return None
        try:
            doc = parse_json(raw[:start] + self._stand_in_json + raw[match.end():], "manifest")
        except ManifestError:
            return None
        if not isinstance(doc, dict) or doc.get("entries") != self._stand_in:
            return None
        sums = [[int(d) for d in group.split(b",")] if group else [] for group in match.groups()]
        if any(s >= 1 << 64 for sums_ in sums for s in sums_):
            return None
        return doc, tuple(map(_with_checksums, text[1], sums))

    def entries(self, raw: list[Any]) -> tuple[Entry, ...]:
        sums = [d.pop("checksums", _NO_SUMS) if type(d) is dict else _NO_SUMS for d in raw]
        try:
            key: bytes | None = marshal.dumps(raw, 2)  # version 2: no back-references, one form per value
        except ValueError:  # nested beyond marshal's limit (the full check refuses it)
            key = None
        finally:
            for d, s in zip(raw, sums):
                if s is not _NO_SUMS:
                    d["checksums"] = s
        last = self._last
        if key is not None and last is not None and last[0] == key and _checksum_lists(sums):
            return tuple(map(_with_checksums, last[1], sums))
        entries = _entries_from_json(raw)
        if key is not None:
            pattern = _entries_pattern(entries)
            with self._lock:
                self._last, self._text = (key, entries), (pattern, entries)
        return entries


_CHECKSUMS_RE = rb"((?:0|[1-9][0-9]*)(?:,(?:0|[1-9][0-9]*))*)?"  # JSON's unsigned integers, comma-separated


def _entries_pattern(entries: Sequence[Entry]) -> re.Pattern[bytes]:
    """The text `Entry.json_pieces` writes for `entries` (a JSON array), any checksums in each one's place."""
    parts = [re.escape(head.encode()) + _CHECKSUMS_RE + re.escape(tail.encode())
             for head, tail in (e.json_pieces() for e in entries)]
    return re.compile(rb"\[" + b",".join(parts) + rb"\]")


def _checksum_lists(sums: list[Any]) -> bool:
    """Every item is a list of 64-bit unsigned integers (what `_entry_from_json` accepts as checksums)."""
    if set(map(type, sums)) != {list}:
        return False
    flat = list(chain.from_iterable(sums))
    return _naturals(flat) and (not flat or max(flat) < 1 << 64)


def _with_checksums(entry: Entry, checksums: list[int]) -> Entry:
    """`entry` with other checksums: its fields copied as they are (checked already), without __init__'s
    per-field setattr (a commit makes one per entry)."""
    new = object.__new__(Entry)
    fields = new.__dict__
    fields.update(entry.__dict__)
    fields["checksums"] = tuple(checksums)
    return new


def _entry_from_json(doc: Any, index: int) -> Entry:
    if not isinstance(doc, dict):
        raise ManifestError(f"entry {index} is not an object")
    name = _typed(doc, "name", str)
    try:
        shape = tuple(_typed(doc, "shape", list))
        checksums = tuple(_typed(doc, "checksums", list))
        offset, nbytes = _typed(doc, "offset", int), _typed(doc, "nbytes", int)
        if len(shape) > 64 or not _naturals(doc["shape"]):
            raise ManifestError("shape must be at most 64 non-negative integers")
        if not _naturals(doc["checksums"]) or (checksums and max(checksums) >= 1 << 64):
            raise ManifestError("checksums must be 64-bit unsigned integers")
        if offset < 0 or nbytes < 0:
            raise ManifestError("offset and nbytes must be non-negative")
        placement = None
        if "global" in doc:
            placement = Placement.from_json(doc["global"], math.prod(shape))
        return Entry(name, _typed(doc, "kind", str), _typed(doc, "dtype", str), shape, offset, nbytes, checksums,
                     placement)
    except ManifestError as exc:
        raise ManifestError(f"entry {index} ({name!r}): {exc}") from exc
