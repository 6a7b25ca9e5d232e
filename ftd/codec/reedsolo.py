"""Reed–Solomon from the pure-Python `reedsolo` package: the portable fallback and test oracle.

The code is reedsolo's own, applied column-wise: for each byte position p, the k data bytes
`data[0][p] .. data[k-1][p]` are a reedsolo message (GF(2^8), primitive polynomial 0x11d,
generator 2, fcr 0) and the m parity bytes at p are its reedsolo parity; rebuilding uses
reedsolo's erasure decoding with the lost positions as erasures.

Calling reedsolo once per byte position runs at about 1 MB/s (MEASURED.md: 0.003 GB/s). Both
maps are linear over GF(2^8), so this module asks reedsolo for them once instead: parity
coefficients from encoding the k unit messages, and, for each set of k surviving positions,
rebuild coefficients from erasure-decoding the k unit codewords. It then applies them to whole
chunks: a product by a constant is a 256-byte `bytes.translate` table (built from reedsolo's
log/exp tables), a sum is a numpy XOR. The bytes are identical to the column-by-column
calls (tests/unit/test_codec.py checks this against reedsolo directly), at roughly 1/10 of
ISA-L's speed instead of 1/1000; bench/codec_bench.py measures both.

Its parity differs from the isal codec's (another generator matrix), so a group must not mix
them; rebuilt data are the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from ftd.codec.base import Chunk, Codec, CodecError

logger = logging.getLogger(__name__)

#: reedsolo keeps its field tables in module globals that RSCodec methods reset on every call;
#: this serialises ftd's (rare: construction and first use of a survivor set) calls into it.
_REEDSOLO_LOCK = threading.Lock()
_warned = False
_warn_lock = threading.Lock()


def _warn_once() -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    logger.warning(
        "reedsolo codec is pure Python and about 10x slower than the isal codec (1,000x if reedsolo "
        "ran byte by byte); use it only as a fallback/oracle (pip install pyeclib for isal)"
    )


def _import_reedsolo():
    try:
        import reedsolo
    except ImportError as exc:
        raise CodecError("the 'reedsolo' codec needs the reedsolo package: pip install reedsolo") from exc
    return reedsolo


class ReedSoloCodec(Codec):
    """Systematic Reed–Solomon over GF(2^8), reedsolo's code, applied column-wise."""

    name = "reedsolo"

    def __init__(self, k: int, m: int) -> None:
        super().__init__(k, m)
        reedsolo = _import_reedsolo()
        _warn_once()
        with _REEDSOLO_LOCK:
            self._rs = reedsolo.RSCodec(nsym=m, nsize=k + m)
            self._rs_error = reedsolo.ReedSolomonError
            gf_exp, gf_log = bytes(self._rs.gf_exp), bytes(self._rs.gf_log)
            # parity[j][i]: coefficient of data chunk i in parity chunk k + j.
            units = [self._rs.encode(self._unit(i, k)) for i in range(k)]
        self._parity = [[units[i][k + j] for i in range(k)] for j in range(m)]
        self._tables = [_mul_table(c, gf_exp, gf_log) for c in range(256)]
        self._rebuild: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self._rebuild_lock = threading.Lock()

    @staticmethod
    def _unit(i: int, length: int) -> bytearray:
        vector = bytearray(length)
        vector[i] = 1
        return vector

    def _rebuild_coefficients(self, sources: tuple[int, ...]) -> dict[int, list[int]]:
        """For each chunk not in `sources`: its coefficients over the k sources (in order)."""
        with self._rebuild_lock:
            cached = self._rebuild.get(sources)
        if cached is not None:
            return cached
        n = self.k + self.m
        erased = [i for i in range(n) if i not in sources]
        columns = []
        with _REEDSOLO_LOCK:
            for s in sources:
                try:
                    _, codeword, _ = self._rs.decode(self._unit(s, n), erase_pos=list(erased), only_erasures=True)
                except self._rs_error as exc:
                    raise CodecError(f"reedsolo cannot rebuild {erased} from {list(sources)}: {exc}") from exc
                columns.append(codeword)
        coefficients = {e: [column[e] for column in columns] for e in erased}
        with self._rebuild_lock:
            self._rebuild[sources] = coefficients
        return coefficients

    def _combine(self, coefficients: Sequence[int], chunks: Sequence[memoryview], length: int) -> memoryview:
        """sum_i coefficients[i] * chunks[i] over GF(2^8), byte-wise."""
        acc: np.ndarray | None = None
        for c, chunk in zip(coefficients, chunks):
            if c == 0:
                continue
            term = chunk if c == 1 else _as_bytes(chunk).translate(self._tables[c])
            values = np.frombuffer(term, dtype=np.uint8)
            if acc is None:
                acc = values.copy()
            else:
                np.bitwise_xor(acc, values, out=acc)
        if acc is None:
            acc = np.zeros(length, dtype=np.uint8)
        return memoryview(acc)

    def _encode(self, data: list[memoryview], length: int) -> list[Chunk]:
        data = [memoryview(_as_bytes(v)) for v in data]  # one copy per chunk, not one per product
        return [self._combine(row, data, length) for row in self._parity]

    def _decode(self, sources: dict[int, memoryview], missing: list[int], length: int) -> Mapping[int, Chunk]:
        order = tuple(sorted(sources))
        coefficients = self._rebuild_coefficients(order)
        chunks = [memoryview(_as_bytes(sources[i])) for i in order]
        return {e: self._combine(coefficients[e], chunks, length) for e in missing}


def _as_bytes(view: memoryview) -> bytes:
    """The bytes behind `view`, copied only when the view is not a whole `bytes` object."""
    obj = view.obj
    if type(obj) is bytes and view.nbytes == len(obj):
        return obj
    return view.tobytes()


def _mul_table(c: int, gf_exp: bytes, gf_log: bytes) -> bytes:
    """The 256-byte translate table of x -> c * x in GF(2^8)."""
    if c == 0:
        return bytes(256)
    log_c = gf_log[c]
    return bytes([0] + [gf_exp[log_c + gf_log[x]] for x in range(1, 256)])
