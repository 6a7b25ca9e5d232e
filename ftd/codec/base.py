"""Erasure codecs: turn k equal data chunks into m parity chunks and back.

The interface is raw bytes in, raw bytes out: no per-fragment headers, no padding. Chunk `i` of
a group is data for `0 <= i < k` and parity for `k <= i < k + m`; the codes are systematic, so
the data chunks are stored as they are and only parity is computed.

Parity bytes are backend-specific (each backend has its own generator matrix): every node of a
group must encode and decode with the same codec, so the codec's `name` (with k, m) belongs in
the group's metadata, and `make_codec(name, k, m)` must be given that recorded name, never
"auto", when rebuilding. The data a backend rebuilds is the same whatever the backend.

Backends implement `_encode` and `_decode` on already validated, byte-formatted views; the
public `encode` and `decode` here do the argument checks once for all of them.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

from ftd.errors import FtdError

#: What a chunk may be: anything with the buffer protocol that is C-contiguous.
Chunk = Union[bytes, bytearray, memoryview]

#: GF(2^8) codes: at most 255 chunks per group (both backends).
MAX_CHUNKS = 255


class CodecError(FtdError):
    """Bad codec arguments (k, m, chunk counts, lengths, indices) or a backend failure."""


def byte_view(chunk: object, what: str) -> memoryview:
    """`chunk` as a flat unsigned-byte memoryview (no copy); CodecError if it is not one."""
    try:
        view = memoryview(chunk)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CodecError(f"{what} is a {type(chunk).__name__}, not a bytes-like object") from exc
    if not view.c_contiguous:
        raise CodecError(f"{what} is not C-contiguous memory")
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise CodecError(f"{what} is not C-contiguous memory") from exc
    return view


def data_views(codec: Codec, data: Sequence[Chunk]) -> tuple[list[memoryview], int]:
    """The k data chunks as byte views, and their common length."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"encode wants a sequence of {codec.k} chunks, not one bytes-like object")
    views = [byte_view(chunk, f"data chunk {i}") for i, chunk in enumerate(data)]
    if len(views) != codec.k:
        raise CodecError(f"{codec.name} {codec.k}+{codec.m}: encode wants {codec.k} data chunks, got {len(views)}")
    return views, _common_length({i: v for i, v in enumerate(views)})


def _common_length(views: Mapping[int, memoryview]) -> int:
    lengths = {len(v) for v in views.values()}
    if len(lengths) > 1:
        by_index = ", ".join(f"{i}: {len(v)}" for i, v in sorted(views.items()))
        raise CodecError(f"chunks of one call must have equal lengths; got {{{by_index}}}")
    return lengths.pop() if lengths else 0


@dataclass(frozen=True)
class DecodePlan:
    """What one `decode` call does: copy the wanted chunks that are present, rebuild the rest."""

    length: int
    #: The wanted indices, without repeats, in the order asked for.
    want: list[int]
    #: Present wanted chunks, returned as copies.
    copies: dict[int, memoryview]
    #: Wanted chunks that are not present, in ascending order.
    missing: list[int]
    #: Exactly k present chunks to rebuild `missing` from (the lowest indices); empty if nothing is missing.
    sources: dict[int, memoryview]


def plan_decode(codec: Codec, present: Mapping[int, Chunk], want: Sequence[int]) -> DecodePlan:
    """Validate a decode call and choose its sources."""
    n = codec.k + codec.m
    if not isinstance(present, Mapping):
        raise CodecError(f"present must map chunk index -> chunk, not {type(present).__name__}")
    views: dict[int, memoryview] = {}
    for index, chunk in present.items():
        views[_check_index(index, n, "present")] = byte_view(chunk, f"chunk {index}")
    if isinstance(want, (int, str, bytes)):
        raise CodecError(f"want must be a sequence of chunk indices, not {type(want).__name__}")
    wanted: list[int] = []
    for index in want:
        value = _check_index(index, n, "wanted")
        if value not in wanted:
            wanted.append(value)
    length = _common_length(views)
    missing = sorted(i for i in wanted if i not in views)
    sources: dict[int, memoryview] = {}
    if missing:
        have = sorted(views)
        if len(have) < codec.k:
            lost = [i for i in range(n) if i not in views]
            raise CodecError(
                f"{codec.name} {codec.k}+{codec.m}: rebuilding chunks {missing} needs any {codec.k} of the "
                f"{n} chunks; only {len(have)} present {have}, missing {lost}"
            )
        sources = {i: views[i] for i in have[: codec.k]}
    copies = {i: views[i] for i in wanted if i in views}
    return DecodePlan(length=length, want=wanted, copies=copies, missing=missing, sources=sources)


def _check_index(index: object, n: int, what: str) -> int:
    """`index` as an int (numpy integers welcome, bools not) in 0..n-1."""
    try:
        value = operator.index(index) if not isinstance(index, bool) else -1  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if not 0 <= value < n:
        raise CodecError(f"{what} chunk index {index!r} is out of range 0..{n - 1}")
    return value


class Codec(abc.ABC):
    """A systematic (k, m) erasure code over equal-length byte chunks.

    `encode` and `decode` are safe to call from several threads; whether they run in parallel
    depends on the backend (pyeclib holds the GIL for a whole call).
    """

    #: Names the parity layout: nodes of one group must use the same name.
    name: str = ""
    #: Largest k + m the backend supports.
    max_chunks: int = MAX_CHUNKS

    def __init__(self, k: int, m: int) -> None:
        for label, value in (("k", k), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CodecError(f"{self.name}: {label} must be an integer >= 1, got {value!r}")
        if k + m > self.max_chunks:
            raise CodecError(f"{self.name}: k + m = {k + m} exceeds the backend's limit of {self.max_chunks} chunks")
        self.k = k
        self.m = m

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, m={self.m})"

    def encode(self, data: Sequence[Chunk]) -> list[bytes]:
        """Return the m parity chunks for k equal-length data chunks."""
        views, length = data_views(self, data)
        if length == 0:
            return [b"" for _ in range(self.m)]
        return [bytes(p) for p in self._encode(views, length)]

    def decode(self, present: Mapping[int, Chunk], want: Sequence[int]) -> dict[int, bytes]:
        """Rebuild chunks `want` (indices 0..k+m-1; data are 0..k-1, parity k..k+m-1) from any k chunks in `present`.

        Wanted chunks that are present are returned as copies. When more than k are present,
        the k lowest indices are used (data before parity); the others are not checked.
        """
        plan = plan_decode(self, present, want)
        out = {i: bytes(v) for i, v in plan.copies.items()}
        if plan.missing:
            if plan.length == 0:
                rebuilt: Mapping[int, Chunk] = {i: b"" for i in plan.missing}
            else:
                rebuilt = self._decode(plan.sources, plan.missing, plan.length)
            out.update((i, bytes(rebuilt[i])) for i in plan.missing)
        return {i: out[i] for i in plan.want}

    @abc.abstractmethod
    def _encode(self, data: list[memoryview], length: int) -> list[Chunk]:
        """The m parity chunks of `data` (k byte views of `length` > 0 bytes each)."""

    @abc.abstractmethod
    def _decode(self, sources: dict[int, memoryview], missing: list[int], length: int) -> Mapping[int, Chunk]:
        """Chunks `missing` rebuilt from exactly k `sources` of `length` > 0 bytes each."""
