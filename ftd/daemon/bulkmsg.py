"""The messages of the bulk plane, typed, in one place (the keys of ftd.daemon.bulk requests).

Every request names what it reads or writes with a key; this module builds those keys from
typed values and parses them back, with every field checked, so no other module touches key
strings. The wire keys are those of earlier releases (a mixed cluster keeps working):

    DataChunk      {"kind": "data", "step", "chunk", "C"}          a node's blob, chunk of C bytes
    ParityChunk    {"kind": "parity", "step", "rot", "j"(, "size")} parity j of a rotation
    Record         {"kind": "record(_size)", "step", "rot"}        a rotation record (JSON)
    SegmentManifest{"kind": "segment_manifest(_size)", "job", "rank", "step"}
    Segment        {"kind": "segment(_size)", "job", "rank", "step"}  a rank's sealed bytes
    Holdings       {"kind": "holdings", "job"}                     every sealed segment a node holds (JSON)
    Adopt          {"kind": "adopt", "job", "step", "node"}        decode a lost member's step here (JSON status)

Objects whose size the reader does not know ahead (records, manifests, segments) are read
"size first, then payload": `read_sized` asks for the 16-byte decimal size under the `_size`
kind, checks it against a limit, then pulls that many bytes. `serve_sized` is the other side.
Holdings and Adopt answer small JSON documents that change from one request to the next, so they
are read in one piece of a fixed size, padded with spaces (`serve_padded`, `read_padded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ftd.daemon.bulk import BulkClient, Key
from ftd.errors import FtdError

SIZE_BYTES = 16
SIZE_SUFFIX = "_size"


@dataclass(frozen=True)
class DataChunk:
    """Data chunk `chunk` (of `chunk_bytes` bytes) of a node's blob of `step`."""

    step: int
    chunk: int
    chunk_bytes: int

    def key(self) -> Key:
        return {"kind": "data", "step": self.step, "chunk": self.chunk, "C": self.chunk_bytes}


@dataclass(frozen=True)
class ParityChunk:
    """Parity `j` of rotation `rot` of `step`; `size` (the chunk's bytes) travels with a write."""

    step: int
    rot: int
    j: int
    size: int = 0

    def key(self) -> Key:
        key: Key = {"kind": "parity", "step": self.step, "rot": self.rot, "j": self.j}
        if self.size:
            key["size"] = self.size
        return key


@dataclass(frozen=True)
class Record:
    """The rotation record of rotation `rot` of `step` (sized)."""

    step: int
    rot: int
    kind = "record"

    def key(self) -> Key:
        return {"kind": self.kind, "step": self.step, "rot": self.rot}


@dataclass(frozen=True)
class SegmentManifest:
    """The manifest of rank `rank`'s sealed segment of `step` (sized)."""

    job: str
    rank: int
    step: int
    kind = "segment_manifest"

    def key(self) -> Key:
        return {"kind": self.kind, "job": self.job, "rank": self.rank, "step": self.step}


@dataclass(frozen=True)
class Segment:
    """The data bytes of rank `rank`'s sealed segment of `step` (sized)."""

    job: str
    rank: int
    step: int
    kind = "segment"

    def key(self) -> Key:
        return {"kind": self.kind, "job": self.job, "rank": self.rank, "step": self.step}


@dataclass(frozen=True)
class Holdings:
    """Every sealed segment of `job` the node holds: rank, step, world size, source, bytes (padded JSON)."""

    job: str

    def key(self) -> Key:
        return {"kind": "holdings", "job": self.job}


@dataclass(frozen=True)
class Adopt:
    """Ask the node to decode group member `node`'s data of `step` into its own store (a lost node that is
    not replaced); the answer is the adoption's state (padded JSON), asking again polls it."""

    job: str
    step: int
    node: int

    def key(self) -> Key:
        return {"kind": "adopt", "job": self.job, "step": self.step, "node": self.node}


PADDED_BYTES = 64 << 10
"""The size of a Holdings or Adopt answer."""

Sized = Union[Record, SegmentManifest, Segment]
Message = Union[DataChunk, ParityChunk, Record, SegmentManifest, Segment, Holdings, Adopt]


def size_key(message: Sized) -> Key:
    """The key that asks for `message`'s size."""
    return {**message.key(), "kind": message.kind + SIZE_SUFFIX}


def _int(key: Key, name: str, low: int = 0) -> int:
    value = key.get(name)
    if type(value) is not int or value < low:
        raise ValueError(f"bulk key {name!r} must be an integer >= {low}, got {value!r:.40}")
    return value


def _str(key: Key, name: str) -> str:
    value = key.get(name)
    if not isinstance(value, str):
        raise ValueError(f"bulk key {name!r} must be a string, got {value!r:.40}")
    return value


def parse(key: Key) -> tuple[Message, bool]:
    """(message, asks_for_size) of a request key; ValueError for anything malformed, KeyError for an
    unknown kind. The `from` item (who asks, for metrics) is ignored here."""
    kind = key.get("kind")
    if not isinstance(kind, str):
        raise ValueError("bulk key has no kind")
    sized = kind.endswith(SIZE_SUFFIX)
    base = kind[: -len(SIZE_SUFFIX)] if sized else kind
    message: Message
    if base == "data" and not sized:
        message = DataChunk(_int(key, "step"), _int(key, "chunk"), _int(key, "C", 1))
    elif base == "parity" and not sized:
        message = ParityChunk(_int(key, "step"), _int(key, "rot"), _int(key, "j"),
                              _int(key, "size") if "size" in key else 0)
    elif base == "record":
        message = Record(_int(key, "step"), _int(key, "rot"))
    elif base == "segment_manifest":
        message = SegmentManifest(_str(key, "job"), _int(key, "rank"), _int(key, "step"))
    elif base == "segment":
        message = Segment(_str(key, "job"), _int(key, "rank"), _int(key, "step"))
    elif base == "holdings" and not sized:
        message = Holdings(_str(key, "job"))
    elif base == "adopt" and not sized:
        message = Adopt(_str(key, "job"), _int(key, "step"), _int(key, "node"))
    else:
        raise KeyError(f"unknown kind {kind!r}")
    return message, sized


def sender(key: Key) -> Any:
    """Who sent the request, as it says (only for labelling metrics)."""
    return key.get("from")


def encode_size(n: int) -> bytes:
    return b"%16d" % n


def parse_size(raw: bytes | memoryview, limit: int, what: str) -> int:
    """A peer's 16-byte decimal size of `what`; FtdError when it is not a number in [0, limit]."""
    try:
        size = int(bytes(raw))
    except ValueError:
        raise FtdError(f"peer sent a malformed size of its {what}") from None
    if not 0 <= size <= limit:
        raise FtdError(f"peer announced a {what} of {size} bytes, more than the {limit} allowed")
    return size


def read_sized(client: BulkClient, message: Sized, limit: int, what: str, timeout: float) -> bytearray:
    """Size first, then payload: the whole of `message`'s object from a peer, at most `limit` bytes."""
    size = parse_size(client.get(size_key(message), 0, SIZE_BYTES, timeout), limit, what)
    buf = bytearray(size)
    if size:
        client.get_range(message.key(), 0, size, memoryview(buf), timeout)
    return buf


def serve_sized(payload_bytes: int, read: Any, asks_for_size: bool, offset: int, length: int) -> bytes:
    """The reader's side of a sized object of `payload_bytes`: its size, or `read(offset, length)` within it."""
    if asks_for_size:
        return encode_size(payload_bytes)
    if offset + length > payload_bytes:
        raise ValueError(f"read past the {payload_bytes} bytes of the object")
    return read(offset, length)


def serve_padded(doc: bytes, offset: int, length: int) -> bytes:
    """The reader's side of a padded answer: the whole document, padded with spaces to PADDED_BYTES."""
    if (offset, length) != (0, PADDED_BYTES):
        raise ValueError(f"a padded answer is read whole: offset 0, {PADDED_BYTES} bytes")
    if len(doc) > PADDED_BYTES:
        raise ValueError(f"the answer has {len(doc)} bytes, more than the {PADDED_BYTES} it may have")
    return doc + b" " * (PADDED_BYTES - len(doc))


def read_padded(client: BulkClient, message: Holdings | Adopt, what: str, timeout: float) -> Any:
    """A padded JSON answer from a peer, parsed; FtdError when it is not a JSON object."""
    import json

    raw = bytes(client.get(message.key(), 0, PADDED_BYTES, timeout))
    try:
        doc = json.loads(raw)
    except ValueError:
        raise FtdError(f"peer sent a malformed {what}") from None
    if not isinstance(doc, dict):
        raise FtdError(f"peer sent a malformed {what}")
    return doc
