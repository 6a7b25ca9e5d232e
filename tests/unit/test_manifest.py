"""ftd.manifest: layout, JSON round trip, strict parsing, validation against a segment, checksums."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ftd.errors import ManifestError, SnapshotCorrupt
from ftd.manifest import (
    ALIGN,
    DIGEST_KEY,
    DTYPE_SIZES,
    FORMAT_VERSION,
    Entry,
    EntrySpec,
    Manifest,
    align_up,
    chunk_checksums,
    itemsize,
    layout,
    manifest_digest,
)

CHUNK = 64


def _specs() -> list[EntrySpec]:
    return [
        EntrySpec("model/w", "param", "float32", (3, 5)),      # 60 bytes
        EntrySpec("model/b", "buffer", "int64", (7,)),         # 56 bytes
        EntrySpec("model/flag", "buffer", "bool", ()),         # 1 byte (0-dim)
        EntrySpec("model/empty", "buffer", "float16", (0, 4)),  # 0 bytes
        EntrySpec("optim/m", "optim", "bfloat16", (100,)),     # 200 bytes
        EntrySpec("extra/c", "extra", "complex128", (2, 1)),   # 32 bytes
    ]


def _data(nbytes: int) -> bytearray:
    return bytearray((i * 7 + 3) % 251 for i in range(nbytes))


def _manifest(data: bytes | bytearray | None = None, **changes) -> Manifest:
    entries, total = layout(_specs())
    data = _data(total) if data is None else data
    view = memoryview(bytes(data))
    sealed = tuple(dataclasses.replace(e, checksums=chunk_checksums(view[e.offset:e.offset + e.nbytes], CHUNK))
                   for e in entries)
    fields = dict(job="j", rank=1, world_size=4, step=12, chunk_bytes=CHUNK, data_bytes=total, entries=sealed,
                  meta={"step": 12, "rng": {"x": [1, 2.5, None]}, "nan": float("nan")})
    fields.update(changes)
    return Manifest(**fields)


def _doc() -> dict:
    return json.loads(_manifest().to_json())


def _raw(doc: dict, seal: bool = True) -> bytes:
    """`doc` as a manifest file; `seal` recomputes its checksum (tests of the other checks)."""
    doc = dict(doc)
    if seal:
        doc[DIGEST_KEY] = manifest_digest(doc)
    return json.dumps(doc).encode()


# ---- layout -----------------------------------------------------------------------------------


def test_layout_aligns_every_entry_and_covers_them():
    entries, total = layout(_specs())
    assert [e.name for e in entries] == [s.name for s in _specs()]
    prev_end = 0
    for spec, e in zip(_specs(), entries):
        assert e.offset % ALIGN == 0
        assert e.offset >= prev_end
        assert e.offset == align_up(prev_end)  # packed: no more padding than alignment needs
        assert e.nbytes == spec.nbytes == math.prod(spec.shape) * DTYPE_SIZES[spec.dtype]
        assert (e.dtype, e.shape, e.kind) == (spec.dtype, spec.shape, spec.kind)
        assert e.checksums == ()
        prev_end = e.offset + e.nbytes
    assert total == align_up(prev_end)
    assert total % ALIGN == 0


def test_layout_offsets_explicit():
    entries, total = layout([EntrySpec("a", "param", "float32", (1,)), EntrySpec("b", "param", "float64", (9,)),
                             EntrySpec("c", "param", "uint8", (64,)), EntrySpec("d", "param", "uint8", (1,))])
    assert [e.offset for e in entries] == [0, 64, 192, 256]
    assert total == 320


def test_layout_empty():
    assert layout([]) == ([], 0)


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 64), (63, 64), (64, 64), (65, 128), (1000, 1024)])
def test_align_up(n, expected):
    assert align_up(n) == expected


def test_itemsize_rejects_unknown_dtypes():
    assert itemsize("float8_e5m2") == 1 and itemsize("complex128") == 16
    for bad in ("float128", "torch.float32", "qint8", "", None, 4):
        with pytest.raises(ManifestError):
            itemsize(bad)  # type: ignore[arg-type]


# ---- JSON round trip --------------------------------------------------------------------------


def test_to_json_from_json_round_trip():
    m = _manifest()
    back = Manifest.from_json(m.to_json())
    assert back.entries == m.entries
    assert (back.job, back.rank, back.world_size, back.step, back.chunk_bytes, back.data_bytes) == \
           (m.job, m.rank, m.world_size, m.step, m.chunk_bytes, m.data_bytes)
    assert math.isnan(back.meta.pop("nan"))
    assert back.meta == {"step": 12, "rng": {"x": [1, 2.5, None]}}
    assert back.format == FORMAT_VERSION
    assert back.to_json() == Manifest.from_json(back.to_json()).to_json()
    assert all(isinstance(e.shape, tuple) and isinstance(e.checksums, tuple) for e in back.entries)


def test_from_json_keeps_large_checksums_exact():
    doc = _doc()
    doc["entries"][0]["checksums"][0] = (1 << 64) - 1
    assert Manifest.from_json(_raw(doc)).entries[0].checksums[0] == (1 << 64) - 1


# ---- malformed manifests ----------------------------------------------------------------------


def _mutations():
    def top(key, value):
        def f(d):
            d[key] = value
        return f

    def drop(key):
        def f(d):
            del d[key]
        return f

    def entry(key, value, index=0):
        def f(d):
            d["entries"][index][key] = value
        return f

    def entry_drop(key):
        def f(d):
            del d["entries"][0][key]
        return f

    return {
        "format-2": top("format", FORMAT_VERSION + 1),
        "format-missing": drop("format"),
        "format-str": top("format", "1"),
        "checksum-algo": top("checksum", "crc32"),
        "job-int": top("job", 3),
        "job-missing": drop("job"),
        "rank-str": top("rank", "1"),
        "rank-float": top("rank", 1.0),
        "rank-bool": top("rank", True),
        "step-negative": top("step", -1),
        "world-null": top("world_size", None),
        "chunk-zero": top("chunk_bytes", 0),
        "data-bytes-bool": top("data_bytes", False),
        "meta-list": top("meta", []),
        "meta-missing": drop("meta"),
        "entries-dict": top("entries", {}),
        "entry-not-object": top("entries", [[1, 2]]),
        "entry-name-int": entry("name", 5),
        "entry-offset-negative": entry("offset", -64),
        "entry-nbytes-negative": entry("nbytes", -1),
        "entry-offset-bool": entry("offset", True),
        "entry-offset-float": entry("offset", 64.0),
        "entry-nbytes-str": entry("nbytes", "60"),
        "entry-shape-str": entry("shape", "3,5"),
        "entry-shape-negative": entry("shape", [-3, 5]),
        "entry-shape-bool": entry("shape", [True, 5]),
        "entry-shape-float": entry("shape", [3.0, 5]),
        "entry-shape-too-long": entry("shape", [1] * 65),
        "entry-checksum-negative": entry("checksums", [-1]),
        "entry-checksum-too-big": entry("checksums", [1 << 64]),
        "entry-checksum-str": entry("checksums", ["abc"]),
        "entry-kind-missing": entry_drop("kind"),
        "entry-dtype-int": entry("dtype", 4),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_from_json_rejects_malformed(name):
    doc = _doc()
    _mutations()[name](doc)
    with pytest.raises(ManifestError):
        Manifest.from_json(_raw(doc))


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"[1, 2]", b"null", b"42", b'"text"', b"\xff\xfe\x00",
                                 b"{'job': 'j'}"])
def test_from_json_rejects_non_objects(raw):
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)


def test_from_json_names_the_bad_entry():
    doc = _doc()
    doc["entries"][2]["offset"] = -64
    with pytest.raises(ManifestError, match="entry 2") as err:
        Manifest.from_json(_raw(doc))
    assert "model/flag" in str(err.value)


def test_manifest_error_is_snapshot_corrupt():
    with pytest.raises(SnapshotCorrupt):
        Manifest.from_json(b"nope")


def test_from_json_rejects_bool_format():
    doc = _doc()
    doc["format"] = True
    with pytest.raises(ManifestError):
        Manifest.from_json(_raw(doc))


def test_from_json_rejects_bool_checksums():
    doc = _doc()
    n = len(doc["entries"][0]["checksums"])
    doc["entries"][0]["checksums"] = [True] * n
    with pytest.raises(ManifestError):
        Manifest.from_json(_raw(doc))


def test_unknown_dtype_is_rejected_before_use():
    # from_json only type-checks the dtype name; validate() (always run before a manifest is used:
    # daemon commit, adoption, restore) resolves it.
    doc = _doc()
    doc["entries"][0]["dtype"] = "float128"
    with pytest.raises(ManifestError, match="float128"):
        Manifest.from_json(_raw(doc)).validate(1 << 20)


def test_unknown_kind_is_rejected_by_validate():
    doc = _doc()
    doc["entries"][0]["kind"] = "weights"
    with pytest.raises(ManifestError, match="weights"):
        Manifest.from_json(_raw(doc)).validate(1 << 20)


# ---- validate() -------------------------------------------------------------------------------


def test_validate_accepts_a_good_manifest():
    m = _manifest()
    m.validate(m.data_bytes)
    m.validate(m.data_bytes + 4096)
    Manifest.from_json(m.to_json()).validate(m.data_bytes)


def test_validate_rejects_data_larger_than_segment():
    m = _manifest()
    with pytest.raises(ManifestError, match="segment holds"):
        m.validate(m.data_bytes - 1)


def _replace_entry(m: Manifest, index: int, **changes) -> Manifest:
    entries = list(m.entries)
    entries[index] = dataclasses.replace(entries[index], **changes)
    return dataclasses.replace(m, entries=tuple(entries))


def test_validate_rejects_entry_outside_the_segment():
    m = _manifest()
    last = len(m.entries) - 1
    bad = _replace_entry(m, last, offset=m.data_bytes)  # starts at the end, runs past it
    with pytest.raises(ManifestError) as err:
        bad.validate(1 << 20)
    assert err.value.entry == m.entries[last].name
    assert "outside" in str(err.value)


def test_validate_rejects_misaligned_entry():
    m = _manifest()
    with pytest.raises(ManifestError, match="misaligned") as err:
        _replace_entry(m, 1, offset=m.entries[1].offset + 8).validate(1 << 20)
    assert err.value.entry == "model/b"


def test_validate_rejects_nbytes_mismatch():
    m = _manifest()
    with pytest.raises(ManifestError, match="nbytes") as err:
        _replace_entry(m, 0, nbytes=m.entries[0].nbytes + 4).validate(1 << 20)
    assert err.value.entry == "model/w"
    with pytest.raises(ManifestError, match="nbytes"):
        _replace_entry(m, 0, shape=(3, 4)).validate(1 << 20)


def test_validate_rejects_duplicate_names():
    m = _manifest()
    entries = list(m.entries)
    entries[1] = dataclasses.replace(entries[1], name=entries[0].name)
    with pytest.raises(ManifestError, match="duplicate") as err:
        dataclasses.replace(m, entries=tuple(entries)).validate(1 << 20)
    assert err.value.entry == entries[0].name


@pytest.mark.parametrize("delta", [-1, 1])
def test_validate_rejects_wrong_checksum_count(delta):
    m = _manifest()
    e = m.entries[4]  # 200 bytes in chunks of 64: 4 checksums
    assert len(e.checksums) == 4
    checksums = e.checksums[:delta] if delta < 0 else e.checksums + (0,)
    with pytest.raises(ManifestError, match="checksums") as err:
        _replace_entry(m, 4, checksums=checksums).validate(1 << 20)
    assert err.value.entry == e.name and err.value.rank == 1 and err.value.step == 12


def test_validate_empty_entry_needs_no_checksum():
    m = _manifest()
    empty = m.entry_map()["model/empty"]
    assert empty.nbytes == 0 and empty.checksums == ()
    with pytest.raises(ManifestError, match="checksums"):
        _replace_entry(m, 3, checksums=(0,)).validate(1 << 20)


# ---- verify() ---------------------------------------------------------------------------------


def test_verify_accepts_the_data_it_was_made_from():
    entries, total = layout(_specs())
    data = _data(total)
    m = _manifest(data)
    m.verify(memoryview(bytes(data)))
    # padding between entries is not covered by checksums
    pad = entries[0].offset + entries[0].nbytes
    data[pad] ^= 0xFF
    m.verify(memoryview(bytes(data)))


@pytest.mark.parametrize("index", [0, 1, 2, 4, 5])
def test_verify_detects_a_flipped_byte_and_names_the_entry(index):
    entries, total = layout(_specs())
    data = _data(total)
    m = _manifest(data)
    e = entries[index]
    pos = e.offset + e.nbytes - 1  # the last byte: a short final chunk
    data[pos] ^= 0x01
    with pytest.raises(SnapshotCorrupt) as err:
        m.verify(memoryview(bytes(data)))
    assert err.value.entry == e.name
    assert e.name in str(err.value)
    assert f"chunk {(e.nbytes - 1) // CHUNK}" in str(err.value)
    # restricted to other entries, the damage is not seen
    m.verify(memoryview(bytes(data)), names=[x.name for x in entries if x.name != e.name])
    with pytest.raises(SnapshotCorrupt):
        m.verify(memoryview(bytes(data)), names=[e.name])


def test_verify_with_missing_checksums_raises_snapshot_corrupt():
    m = _manifest()
    bad = _replace_entry(m, 4, checksums=m.entries[4].checksums[:2])
    entries, total = layout(_specs())
    with pytest.raises(SnapshotCorrupt):
        bad.verify(memoryview(bytes(_data(total))))


def test_chunk_checksums_split():
    data = memoryview(bytes(range(200)))
    sums = chunk_checksums(data, 64)
    assert len(sums) == 4
    assert chunk_checksums(data[:64], 64) == sums[:1]
    assert chunk_checksums(memoryview(b""), 64) == ()
    assert len(set(sums)) == 4


def test_entry_map():
    m = _manifest()
    assert set(m.entry_map()) == {s.name for s in _specs()}
    assert isinstance(m.entry_map()["model/w"], Entry)


# ---- integrity and bounds of the whole manifest ------------------------------------------------

def test_edited_meta_is_refused_by_the_manifest_checksum():
    doc = _doc()
    doc["meta"]["rng"]["x"][1] = 1000.0
    with pytest.raises(ManifestError, match="checksum mismatch"):
        Manifest.from_json(_raw(doc, seal=False))
    Manifest.from_json(_raw(doc))  # the same edit with the checksum recomputed parses


@pytest.mark.parametrize("key", ["meta", "job", "entries", "created_at", "step"])
def test_any_edited_field_is_refused(key):
    doc = _doc()
    doc[key] = {"meta": {"a": 1}, "job": "k", "entries": [], "created_at": 5.0, "step": 13}[key]
    with pytest.raises(ManifestError, match="checksum mismatch"):
        Manifest.from_json(_raw(doc, seal=False))


def test_missing_checksum_and_older_format_are_refused_clearly():
    doc = _doc()
    del doc[DIGEST_KEY]
    with pytest.raises(ManifestError, match="no manifest_xxh3"):
        Manifest.from_json(json.dumps(doc).encode())
    doc["format"] = 1
    with pytest.raises(ManifestError, match="reads formats 2, 3"):
        Manifest.from_json(_raw(doc))


def test_a_format_2_manifest_still_reads_and_has_no_placements():
    doc = _doc()
    doc["format"] = 2
    manifest = Manifest.from_json(_raw(doc))
    assert manifest.format == 2 and all(e.placement is None for e in manifest.entries)
    doc["entries"][0]["global"] = {"fqn": "model.w", "shape": [15], "offsets": [0], "box": [15], "write": True}
    with pytest.raises(ManifestError, match="format-2 manifest cannot carry placements"):
        Manifest.from_json(_raw(doc))


@pytest.mark.parametrize("bad, message", [
    ({"box": [1, 1]}, "does not hold the entry's"),
    ({"offsets": [3, 0]}, "exceeds"),
    ({"offsets": [0]}, "differ in rank"),
    ({"fqn": ""}, "a name of 1"),
    ({"write": 1}, "a write flag"),
    ({"shape": [-1, 4]}, "non-negative integers"),
])
def test_a_malformed_placement_is_refused(bad, message):
    doc = _doc()
    entry = doc["entries"][0]
    numel = math.prod(entry["shape"])
    placement = {"fqn": "model.w", "shape": [numel, 1], "offsets": [0, 0], "box": [numel, 1], "write": True}
    entry["global"] = dict(placement, **bad)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(_raw(doc))
    entry["global"] = placement
    parsed = Manifest.from_json(_raw(doc)).entries[0].placement
    assert parsed is not None and parsed.box == (numel, 1) and parsed.write


def test_metrics_round_trip_and_are_absent_when_none():
    metrics = {"loss": 2.3125, "tokens": 4096.0, "grad_norm": math.inf, "lr": 1e-4}
    parsed = Manifest.from_json(_manifest(metrics=metrics).to_json())
    assert parsed.metrics == metrics
    assert "metrics" not in _doc() and Manifest.from_json(_manifest().to_json()).metrics == {}
    assert math.isnan(Manifest.from_json(_manifest(metrics={"loss": math.nan}).to_json()).metrics["loss"])


def test_edited_metrics_are_refused():
    doc = json.loads(_manifest(metrics={"loss": 2.5}).to_json())
    doc["metrics"]["loss"] = 0.5  # a better loss after the fact
    with pytest.raises(ManifestError, match="checksum mismatch"):
        Manifest.from_json(_raw(doc, seal=False))


@pytest.mark.parametrize("bad, message", [
    ([["loss", 1.0]], "must be a mapping"),
    ({"loss": "2.5"}, "metric 'loss' must be a number, got str"),
    ({"loss": True}, "must be a number, got bool"),
    ({"loss": [1.0]}, "must be a number, got list"),
    ({"": 1.0}, "printable text of 1..128"),
    ({"x" * 129: 1.0}, "printable text of 1..128"),
    ({"lo\nss": 1.0}, "printable text"),
    ({f"m{i}": 1.0 for i in range(65)}, "65 metrics exceed the limit of 64"),
])
def test_malformed_metrics_are_a_manifest_error_even_with_a_valid_checksum(bad, message):
    doc = _doc()
    doc["metrics"] = bad
    with pytest.raises(ManifestError, match=f"manifest field 'metrics': .*{message}"):
        Manifest.from_json(_raw(doc))


def test_canonical_checksum_does_not_depend_on_key_order():
    doc = json.loads(_raw(_doc()))  # digested the older way: canonical JSON
    reordered = dict(reversed(list(doc.items())))
    assert Manifest.from_json(json.dumps(reordered).encode()).step == 12


def test_created_at_round_trips():
    m = _manifest(created_at=1234.5)
    assert Manifest.from_json(m.to_json()).created_at == 1234.5


@pytest.mark.parametrize("depth", [65, 600, 5000, 100_000])
def test_deep_json_is_a_manifest_error(depth):
    doc = _doc()
    raw = _raw(doc).decode()
    deep = "[" * depth + "]" * depth
    raw = raw[:-1] + ',"deep":' + deep + "}"
    with pytest.raises(ManifestError, match="nested deeper than 64"):
        Manifest.from_json(raw.encode())


def test_oversized_manifest_is_refused_before_parsing():
    with pytest.raises(ManifestError, match="exceeds the limit"):
        Manifest.from_json(b" " * ((64 << 20) + 1))


def test_a_tensor_referenced_twice_is_refused():
    doc = _doc()
    doc["meta"]["a"] = [{"__tensor__": "optim/m"}] * 300
    with pytest.raises(ManifestError, match="more than once"):
        Manifest.from_json(_raw(doc))
    doc["meta"]["a"] = [{"__tensor__": "optim/m"}]
    assert Manifest.from_json(_raw(doc)).meta["a"] == [{"__tensor__": "optim/m"}]


def test_a_reference_to_no_entry_is_refused():
    doc = _doc()
    doc["meta"]["a"] = {"__tensor__": "nope"}
    with pytest.raises(ManifestError, match="not an entry"):
        Manifest.from_json(_raw(doc))
