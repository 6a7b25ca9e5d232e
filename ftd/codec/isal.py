"""ISA-L Reed–Solomon (Cauchy) through pyeclib, mapped onto the raw-chunk codec interface.

pyeclib works on *fragments*: a fixed-size header (80 bytes in pyeclib 1.8) followed by the
payload. Its codes are systematic and, for ISA-L, it does not pad when the input is k·L bytes:
data fragment i's payload is data chunk i byte for byte, parity fragments carry the parity.

Headers without the stored data. With `chksum_type="none"` a header holds only the fragment
index, the payload size, the original size (k·L), the backend id and version, a magic and a
checksum over those fields, never anything that depends on the payload. pyeclib *does* check
the header (a flipped bit fails with "Fragment integrity check failed"), so the headers must be
exact, and they are: the headers for chunk length L are taken from one encode of L-byte chunks
(a real one, or k·L zero bytes when this process has not encoded that length yet) and reused.
Construction checks the two assumptions (payload == chunk, headers independent of content) on a
small encode and refuses to run if a pyeclib release breaks them. Nothing is carried from encode
to decode beyond (k, m, L); rebuilding nodes never need the headers another node saw.

Call cost. pyeclib takes only `bytes` (encode rejects a bytearray or memoryview; reconstruct
aborts the whole process on one, in a liberasurecode assertion), so each call copies its input; it holds the GIL for the whole call and allocates its output per
call, which is why very large calls are slow: feed it stripes (see ftd.codec.stripe).
`isa_l_rs_cauchy` is used rather than `isa_l_rs_vand`: measured equally fast, and its Cauchy
matrix is MDS for every (k, m), while ISA-L documents its Vandermonde matrix as not invertible
for every survivor set at some larger (k, m).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from ftd.codec.base import Chunk, Codec, CodecError

EC_TYPE = "isa_l_rs_cauchy"
#: How many chunk lengths keep their headers (a striped caller uses two: the stripe and the tail).
_HEADER_CACHE_SIZE = 16


def _import_pyeclib():
    try:
        from pyeclib import ec_iface
    except ImportError as exc:
        raise CodecError("the 'isal' codec needs pyeclib: pip install pyeclib (its wheel bundles ISA-L)") from exc
    return ec_iface


def pyeclib_available() -> bool:
    """Whether pyeclib (and so the isal codec) can be imported."""
    try:
        _import_pyeclib()
    except CodecError:
        return False
    return True


class IsalCodec(Codec):
    """Reed–Solomon over GF(2^8) with ISA-L's Cauchy generator matrix."""

    name = "isal"

    def __init__(self, k: int, m: int) -> None:
        super().__init__(k, m)
        ec_iface = _import_pyeclib()
        self._pyeclib_error = ec_iface.ECDriverError
        try:
            self._driver = ec_iface.ECDriver(k=k, m=m, ec_type=EC_TYPE, chksum_type="none")
        except self._pyeclib_error as exc:
            raise CodecError(f"pyeclib cannot build {EC_TYPE} {k}+{m}: {exc}") from exc
        self._lock = threading.Lock()
        self._headers: dict[int, tuple[bytes, ...]] = {}
        self._header_bytes = -1
        self._self_check()

    def _self_check(self) -> None:
        """Refuse a pyeclib whose fragments are not header + raw chunk with content-free headers."""
        length = 3
        first = [os.urandom(length) for _ in range(self.k)]
        second = [bytes(length)] * self.k
        frags_a = self._fragments(b"".join(first), length)
        frags_b = self._fragments(b"".join(second), length)
        cut = self._header_bytes
        if any(f[cut:] != chunk for f, chunk in zip(frags_a, first)):
            raise CodecError(f"pyeclib {EC_TYPE}: data fragments are not the input chunks; this pyeclib is not supported")
        if [f[:cut] for f in frags_a] != [f[:cut] for f in frags_b]:
            raise CodecError(f"pyeclib {EC_TYPE}: fragment headers depend on the data; this pyeclib is not supported")

    def _fragments(self, joined: bytes, length: int) -> list[bytes]:
        """pyeclib's k + m fragments of `joined` (k·length bytes), checked for shape."""
        try:
            frags = self._driver.encode(joined)
        except self._pyeclib_error as exc:
            raise CodecError(f"pyeclib {EC_TYPE} encode failed: {exc}") from exc
        n = self.k + self.m
        header = len(frags[0]) - length if frags else -1
        if len(frags) != n or header <= 0 or any(len(f) != header + length for f in frags):
            sizes = sorted({len(f) for f in frags})
            raise CodecError(
                f"pyeclib {EC_TYPE} returned {len(frags)} fragments of sizes {sizes} for {n} chunks of "
                f"{length} bytes; expected header + {length} each (did pyeclib start padding?)"
            )
        if self._header_bytes == -1:
            self._header_bytes = header
        elif header != self._header_bytes:
            raise CodecError(f"pyeclib {EC_TYPE}: fragment header size changed from {self._header_bytes} to {header}")
        self._remember_headers(length, frags)
        return frags

    def _remember_headers(self, length: int, frags: list[bytes]) -> None:
        with self._lock:
            if length in self._headers:
                return
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.pop(next(iter(self._headers)))
            self._headers[length] = tuple(f[: self._header_bytes] for f in frags)

    def _headers_for(self, length: int) -> tuple[bytes, ...]:
        with self._lock:
            headers = self._headers.get(length)
        if headers is None:
            # Headers do not depend on content (checked at construction): encode zeros once.
            self._fragments(bytes(self.k * length), length)
            with self._lock:
                headers = self._headers[length]
        return headers

    def _encode(self, data: list[memoryview], length: int) -> list[Chunk]:
        frags = self._fragments(b"".join(data), length)
        cut = self._header_bytes
        return [memoryview(f)[cut:] for f in frags[self.k :]]

    def _decode(self, sources: dict[int, memoryview], missing: list[int], length: int) -> Mapping[int, Chunk]:
        headers = self._headers_for(length)
        frags = [b"".join((headers[i], chunk)) for i, chunk in sorted(sources.items())]
        try:
            rebuilt = self._driver.reconstruct(frags, missing)
        except self._pyeclib_error as exc:
            raise CodecError(f"pyeclib {EC_TYPE} reconstruct of {missing} from {sorted(sources)} failed: {exc}") from exc
        # pyeclib returns the rebuilt fragments in index order, whatever order they were asked
        # in; match them to indices by their headers, which name the index.
        cut = self._header_bytes
        index_of = {headers[i]: i for i in missing}
        out = {index_of.get(f[:cut], -1): memoryview(f)[cut:] for f in rebuilt if len(f) == cut + length}
        if sorted(out) != missing:
            raise CodecError(f"pyeclib {EC_TYPE} reconstruct of {missing} returned fragments it was not asked for")
        return out
