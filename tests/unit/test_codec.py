"""ftd.codec: both backends round-trip every loss pattern, agree on rebuilt data, and reject bad calls."""

from __future__ import annotations

import itertools
import logging
import random
import sys

import numpy as np
import pytest
import reedsolo

from ftd.codec import CodecError, available_codecs, decode_striped, encode_striped, make_codec
from ftd.codec import reedsolo as rs_module
from ftd.codec.isal import pyeclib_available
from ftd.errors import FtdError

pytestmark = pytest.mark.timeout(60)

NEEDS_PYECLIB = pytest.mark.skipif(not pyeclib_available(), reason="pyeclib is not importable (pip install pyeclib)")
BACKENDS = [pytest.param("isal", marks=NEEDS_PYECLIB), "reedsolo"]
SHAPES = [(4, 2), (3, 1), (1, 1), (2, 3), (5, 3)]


def _chunks(rng: random.Random, count: int, length: int) -> list[bytes]:
    return [rng.randbytes(length) for _ in range(count)]


def _losses(n: int, m: int):
    """Every set of at most m lost chunk indices."""
    for r in range(m + 1):
        yield from itertools.combinations(range(n), r)


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("k,m", SHAPES)
def test_every_loss_pattern_rebuilds_exact_bytes(name, k, m):
    codec = make_codec(name, k, m)
    assert (codec.name, codec.k, codec.m) == (name, k, m)
    data = _chunks(random.Random(k * 10 + m), k, 4099)  # 4 KiB and odd: no alignment assumed
    parity = codec.encode(data)
    assert len(parity) == m and all(isinstance(p, bytes) and len(p) == 4099 for p in parity)
    every = data + parity
    n = k + m
    for lost in _losses(n, m):
        present = {i: every[i] for i in range(n) if i not in lost}
        rebuilt = codec.decode(present, list(lost))
        assert list(rebuilt) == list(lost)
        assert all(rebuilt[i] == every[i] for i in lost), f"{name} {k}+{m} lost {lost}"
    assert codec.decode(dict(enumerate(every)), range(n)) == dict(enumerate(every))


@pytest.mark.parametrize("name", BACKENDS)
def test_decode_in_a_fresh_codec_needs_nothing_from_encode(name):
    """A rebuilding node has only (name, k, m, chunk length) and the survivors' raw chunks."""
    data = _chunks(random.Random(1), 4, 5000)
    parity = make_codec(name, 4, 2).encode(data)
    rebuilt = make_codec(name, 4, 2).decode({1: data[1], 3: data[3], 4: parity[0], 5: parity[1]}, [2, 0])
    assert list(rebuilt) == [2, 0] and rebuilt == {0: data[0], 2: data[2]}


@pytest.mark.parametrize("name", BACKENDS)
def test_many_lengths_one_codec(name):
    """ISA-L keeps fragment headers per chunk length in a small cache; lengths must not mix up."""
    codec = make_codec(name, 3, 2)
    rng = random.Random(2)
    for length in [*range(1, 40), 1000, 7, 3, 65536]:
        data = _chunks(rng, 3, length)
        parity = codec.encode(data)
        assert codec.decode({1: data[1], 3: parity[0], 4: parity[1]}, [0, 2]) == {0: data[0], 2: data[2]}


@pytest.mark.parametrize("name", BACKENDS)
def test_accepts_any_contiguous_buffer(name):
    codec = make_codec(name, 2, 1)
    floats = np.arange(1024, dtype=np.float32)
    halves = [floats[:512], floats[512:]]
    raw = [h.tobytes() for h in halves]
    assert codec.encode([memoryview(h) for h in halves]) == codec.encode(raw)
    assert codec.encode([bytearray(r) for r in raw]) == codec.encode(raw)
    parity = codec.encode(raw)[0]
    assert codec.decode({1: memoryview(raw[1]), 2: bytearray(parity)}, [0]) == {0: raw[0]}


@pytest.mark.parametrize("name", BACKENDS)
def test_want_order_repeats_and_iterables(name):
    codec = make_codec(name, 2, 2)
    data = [b"abc", b"def"]
    every = data + codec.encode(data)
    present = {1: every[1], 3: every[3]}
    rebuilt = codec.decode(present, (i for i in [3, 0, 3, 2]))
    assert list(rebuilt) == [3, 0, 2] and rebuilt == {3: every[3], 0: every[0], 2: every[2]}
    assert codec.decode(present, []) == {}
    assert codec.decode({np.int64(1): every[1], 3: every[3]}, [np.int32(0)]) == {0: every[0]}
    with pytest.raises(CodecError, match="sequence of chunk indices"):
        codec.decode(present, 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_empty_chunks(name):
    codec = make_codec(name, 4, 2)
    assert codec.encode([b""] * 4) == [b"", b""]
    assert codec.decode({i: b"" for i in range(2, 6)}, [0, 1]) == {0: b"", 1: b""}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_random_property(name, seed):
    rng = random.Random(seed)
    codec = make_codec(name, rng.randint(1, 8), rng.randint(1, 4))
    n = codec.k + codec.m
    for _ in range(4):
        data = _chunks(rng, codec.k, rng.randint(1, 3000))
        every = data + codec.encode(data)
        lost = set(rng.sample(range(n), rng.randint(0, codec.m)))
        want = rng.sample(range(n), rng.randint(1, n))
        rebuilt = codec.decode({i: every[i] for i in range(n) if i not in lost}, want)
        assert rebuilt == {i: every[i] for i in want}


# ---- the two backends --------------------------------------------------------------------------


@NEEDS_PYECLIB
@pytest.mark.parametrize("k,m", [(4, 2), (3, 1), (6, 3)])
def test_backends_rebuild_identical_data_from_the_same_survivors(k, m):
    data = _chunks(random.Random(3), k, 3001)
    isal, rs = make_codec("isal", k, m), make_codec("reedsolo", k, m)
    every = {"isal": data + isal.encode(data), "reedsolo": data + rs.encode(data)}
    n = k + m
    for lost in itertools.combinations(range(n), m):
        survivors = [i for i in range(n) if i not in lost]
        a = isal.decode({i: every["isal"][i] for i in survivors}, range(k))
        b = rs.decode({i: every["reedsolo"][i] for i in survivors}, range(k))
        assert a == b == dict(enumerate(data))


@NEEDS_PYECLIB
def test_parity_is_backend_specific():
    """Documented: a group must agree on the codec name. Mixing parity would rebuild garbage."""
    data = _chunks(random.Random(4), 4, 256)
    assert make_codec("isal", 4, 2).encode(data) != make_codec("reedsolo", 4, 2).encode(data)


def _reedsolo_columns(data: list[bytes], m: int) -> list[bytes]:
    """Parity the slow, literal way: one reedsolo message per byte position."""
    k = len(data)
    rsc = reedsolo.RSCodec(nsym=m, nsize=k + m)
    columns = [rsc.encode(bytearray(column))[k:] for column in zip(*data)]
    return [bytes(column[j] for column in columns) for j in range(m)]


@pytest.mark.parametrize("k,m", [(4, 2), (3, 1), (2, 4)])
def test_reedsolo_equals_reedsolo_column_by_column(k, m):
    """The fast reedsolo codec produces exactly reedsolo's per-byte-position encode and erasure decode."""
    data = _chunks(random.Random(5), k, 64)
    codec = make_codec("reedsolo", k, m)
    parity = codec.encode(data)
    assert parity == _reedsolo_columns(data, m)
    every = data + parity
    n = k + m
    rsc = reedsolo.RSCodec(nsym=m, nsize=k + m)
    for lost in itertools.combinations(range(n), m):
        damaged = [every[i] if i not in lost else bytes(64) for i in range(n)]
        slow = [rsc.decode(bytearray(col), erase_pos=list(lost), only_erasures=True)[1] for col in zip(*damaged)]
        fast = codec.decode({i: every[i] for i in range(n) if i not in lost}, lost)
        assert fast == {i: bytes(col[i] for col in slow) for i in lost}


def test_reedsolo_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(rs_module, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="ftd.codec.reedsolo"):
        make_codec("reedsolo", 4, 2)
        make_codec("reedsolo", 3, 1)
    warnings = [r for r in caplog.records if "pure Python" in r.getMessage()]
    assert len(warnings) == 1 and "fallback/oracle" in warnings[0].getMessage()


# ---- striping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_striped_round_trip_with_a_partial_last_stripe(name):
    codec = make_codec(name, 4, 2)
    length, stripe = 10_007, 1024
    data = _chunks(random.Random(6), 4, length)
    parity = encode_striped(codec, data, stripe_bytes=stripe)
    assert [bytes(p) for p in parity] == codec.encode(data)
    every = data + [bytes(p) for p in parity]
    for lost in itertools.combinations(range(6), 2):
        present = {i: every[i] for i in range(6) if i not in lost}
        want = list(dict.fromkeys([*lost, 5]))  # 5 is copied when present, rebuilt when lost
        rebuilt = decode_striped(codec, present, want, stripe_bytes=stripe)
        assert list(rebuilt) == want
        assert {i: bytes(b) for i, b in rebuilt.items()} == {i: every[i] for i in rebuilt}


@pytest.mark.parametrize("name", BACKENDS)
def test_striped_writes_into_caller_buffers(name):
    codec = make_codec(name, 3, 2)
    data = _chunks(random.Random(7), 3, 3000)
    segment = bytearray(2 * 3000 + 10)  # e.g. a shared-memory segment: outputs are views into it
    views = [memoryview(segment)[10:3010], memoryview(segment)[3010:6010]]
    returned = encode_striped(codec, data, stripe_bytes=700, out=views)
    assert returned == views
    assert [bytes(v) for v in views] == codec.encode(data)
    target = {0: bytearray(3000), 2: bytearray(3000)}
    rebuilt = decode_striped(codec, {1: data[1], 3: views[0], 4: views[1]}, [0, 2], stripe_bytes=999, out=target)
    assert rebuilt[0] is target[0] and (bytes(target[0]), bytes(target[2])) == (data[0], data[2])


def test_striped_rejects_bad_arguments():
    codec = make_codec("reedsolo", 2, 1)
    data = [b"ab", b"cd"]
    for stripe in (0, -1, 1.5, True):
        with pytest.raises(CodecError, match="stripe_bytes"):
            encode_striped(codec, data, stripe_bytes=stripe)
    with pytest.raises(CodecError, match="writable"):
        encode_striped(codec, data, out=[b"xx"])
    with pytest.raises(CodecError, match="writable"):
        encode_striped(codec, data, out=[bytearray(3)])
    with pytest.raises(CodecError, match="out has 2 buffers"):
        encode_striped(codec, data, out=[bytearray(2), bytearray(2)])
    with pytest.raises(CodecError, match="out has buffers"):
        decode_striped(codec, {0: b"ab", 2: b"xy"}, [1], out={0: bytearray(2)})
    with pytest.raises(CodecError, match="equal lengths"):
        encode_striped(codec, [b"ab", b"c"])


# ---- argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_fewer_than_k_present_names_present_and_missing(name):
    codec = make_codec(name, 4, 2)
    with pytest.raises(CodecError) as info:
        codec.decode({0: b"a", 2: b"b", 5: b"c"}, [1])
    message = str(info.value)
    assert "any 4 of the 6" in message and "[0, 2, 5]" in message and "missing [1, 3, 4]" in message
    assert isinstance(info.value, FtdError)
    # Nothing to rebuild: the present wanted chunks come back even with fewer than k.
    assert codec.decode({0: b"a", 2: b"b"}, [2]) == {2: b"b"}


@pytest.mark.parametrize("name", BACKENDS)
def test_rejects_bad_chunks_and_indices(name):
    codec = make_codec(name, 4, 2)
    with pytest.raises(CodecError, match="equal lengths"):
        codec.encode([b"aaaa", b"bbbb", b"cc", b"dddd"])
    with pytest.raises(CodecError, match="equal lengths"):
        codec.decode({0: b"aa", 1: b"bb", 2: b"cc", 4: b"d"}, [3])
    with pytest.raises(CodecError, match="wants 4 data chunks, got 3"):
        codec.encode([b"a", b"b", b"c"])
    with pytest.raises(CodecError, match="not one bytes-like"):
        codec.encode(b"abcd")
    with pytest.raises(CodecError, match="not a bytes-like"):
        codec.encode(["ab", "cd", "ef", "gh"])
    for bad in (6, -1, "1", True):
        with pytest.raises(CodecError, match="out of range 0..5"):
            codec.decode({0: b"a", 1: b"b", 2: b"c", 3: b"d"}, [bad])
        with pytest.raises(CodecError, match="out of range 0..5"):
            codec.decode({bad: b"a", 1: b"b", 2: b"c", 3: b"d"}, [0])
    with pytest.raises(CodecError, match="C-contiguous"):
        codec.encode([np.zeros((4, 4), dtype=np.uint8)[:, 0]] * 4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("k,m", [(0, 1), (1, 0), (-1, 2), (2.0, 1), (True, 1), (250, 6)])
def test_rejects_bad_k_m(name, k, m):
    with pytest.raises(CodecError):
        make_codec(name, k, m)


@NEEDS_PYECLIB
def test_largest_group():
    codec = make_codec("isal", 250, 5)
    data = _chunks(random.Random(8), 250, 16)
    every = data + codec.encode(data)
    assert codec.decode({i: every[i] for i in range(5, 255)}, range(5)) == dict(enumerate(data[:5]))


# ---- registry ----------------------------------------------------------------------------------


def test_registry(monkeypatch):
    assert available_codecs()[-1] == "reedsolo"
    assert make_codec("auto", 4, 2).name == available_codecs()[0]
    with pytest.raises(CodecError, match="unknown codec 'zfec'; known: isal, reedsolo, auto"):
        make_codec("zfec", 4, 2)


def test_without_pyeclib(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyeclib", None)  # makes `import pyeclib` raise ImportError
    assert available_codecs() == ["reedsolo"]
    assert make_codec("auto", 4, 2).name == "reedsolo"
    with pytest.raises(CodecError, match="pip install pyeclib"):
        make_codec("isal", 4, 2)
