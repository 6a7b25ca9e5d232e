"""What a snapshot reuses from the step before (issue 15 §1): the daemon's checked entries (EntryCache), the
trainer's encoded optimizer state, specs, placements and layout (EncodeCache, LayoutCache) and the
manifest's pre-rendered entry text. Each test checks that what is reused never hides a change."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ftd.client import state
from ftd.client.layoutcache import LayoutCache
from ftd.errors import ManifestError
from ftd.manifest import (DIGEST_KEY, EntryCache, EntrySpec, Manifest, Placement, chunk_checksums, entries_template,
                          layout, manifest_digest, render_entries)
from tests.unit import snapkit
from tests.unit.test_manifest import _mutations

JOB = "unit-fixed-cost"
CHUNK = 64


def _specs() -> list[EntrySpec]:
    return [EntrySpec("model/w", "param", "float32", (3, 5), Placement("model.w", (3, 5), (0, 0), (3, 5), True)),
            EntrySpec("model/b", "buffer", "int64", (7,)),
            EntrySpec("optim/m", "optim", "bfloat16", (100,), Placement("optim.state.w.m", (100,), (0,), (100,), True))]


def _manifest(step: int, salt: int = 0) -> Manifest:
    entries, total = layout(_specs())
    data = memoryview(bytes((i * 7 + step + salt) % 251 for i in range(total)))
    sealed = tuple(dataclasses.replace(e, checksums=chunk_checksums(data[e.offset:e.offset + e.nbytes], CHUNK))
                   for e in entries)
    return Manifest(job="j", rank=0, world_size=1, step=step, chunk_bytes=CHUNK, data_bytes=total, entries=sealed,
                    meta={"step": step, "m": {"__tensor__": "optim/m"}})


def _sealed(doc: dict) -> bytes:
    doc = {k: v for k, v in doc.items() if k != DIGEST_KEY}
    doc[DIGEST_KEY] = manifest_digest(doc)
    return json.dumps(doc).encode()


# ---- the daemon's EntryCache ------------------------------------------------------------------


def test_cached_parses_equal_full_parses_step_after_step():
    cache = EntryCache()
    for step in range(1, 6):
        raw = _manifest(step).to_json()
        got = Manifest.from_json(raw, cache)
        assert got == Manifest.from_json(raw)
        assert got.entries[0].checksums == _manifest(step).entries[0].checksums


def _type_changes() -> dict:
    """Edits that == cannot see (1 == 1.0 == True) or that leave the other fields as the cached entries."""
    def entry(index, key, value):
        def f(d):
            d["entries"][index][key] = value
        return f

    def placement(index, key, value):
        def f(d):
            d["entries"][index]["global"][key] = value
        return f

    def drop_checksums(d):
        del d["entries"][1]["checksums"]

    return {"offset-float": entry(1, "offset", 64.0), "nbytes-float": entry(1, "nbytes", 56.0),
            "shape-float": entry(1, "shape", [7.0]), "write-int": placement(0, "write", 1),
            "checksums-missing": drop_checksums, "checksums-null": entry(1, "checksums", None),
            "checksums-negative": entry(1, "checksums", [-1]), "checksums-too-big": entry(1, "checksums", [1 << 64]),
            "checksums-float": entry(1, "checksums", [1.0]), "checksums-bool": entry(1, "checksums", [True])}


def _refuses_as_the_full_check(name: str, write: Callable[[dict[str, Any]], bytes]) -> None:
    """A manifest of step 2 with one change (`name`), written back by `write`: parsed through a cache primed
    with step 1, it loads or fails exactly as the full check does."""
    cache = EntryCache()
    Manifest.from_json(_manifest(1).to_json(), cache)  # primed with the good layout
    doc = json.loads(_manifest(2).to_json())
    _type_changes()[name](doc)
    _same_as_the_full_check(write(doc), cache)


def _same_as_the_full_check(raw: bytes, cache: EntryCache) -> Manifest | None:
    """`raw` parsed through `cache` loads or fails exactly as the full check does; the full parse (or None)."""
    try:
        full = Manifest.from_json(raw)
    except ManifestError as exc:
        with pytest.raises(ManifestError) as cached:
            Manifest.from_json(raw, cache)
        assert str(cached.value) == str(exc)
        return None
    assert Manifest.from_json(raw, cache) == full
    return full


@pytest.mark.parametrize("name", sorted(_type_changes()))
def test_cached_entries_refuse_exactly_what_the_full_check_refuses(name):
    _refuses_as_the_full_check(name, _sealed)


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_every_malformed_manifest_is_refused_with_a_primed_cache(name):
    from tests.unit.test_manifest import _doc, _manifest as good, _raw

    cache = EntryCache()
    Manifest.from_json(good().to_json(), cache)
    doc = _doc()
    _mutations()[name](doc)
    with pytest.raises(ManifestError):
        Manifest.from_json(_raw(doc), cache)


def test_a_changed_layout_is_parsed_afresh():
    cache = EntryCache()
    Manifest.from_json(_manifest(1).to_json(), cache)
    grown = dataclasses.replace(_manifest(2), entries=tuple(
        dataclasses.replace(e, shape=(8,), nbytes=64, checksums=(1, 2)) if e.name == "model/b" else e
        for e in _manifest(2).entries))
    assert Manifest.from_json(grown.to_json(), cache).entries[1].shape == (8,)


def _spliced(doc: dict) -> bytes:
    """`doc` written as Manifest.to_json writes (compact, the digest over the body spliced in last)."""
    import xxhash

    body = json.dumps({k: v for k, v in doc.items() if k != DIGEST_KEY}, separators=(",", ":")).encode()
    return body[:-1] + b',"%s":"%s"}' % (DIGEST_KEY.encode(), xxhash.xxh3_64_hexdigest(body).encode())


def _resealed(text: bytes) -> bytes:
    """A manifest text edited by hand, its spliced digest made to cover the edit."""
    import xxhash

    body = text[:text.rindex(b',"%s"' % DIGEST_KEY.encode())] + b"}"
    return body[:-1] + b',"%s":"%s"}' % (DIGEST_KEY.encode(), xxhash.xxh3_64_hexdigest(body).encode())


def _text_edits() -> dict:
    """Edits of the text itself, where the entries' text is matched rather than parsed."""
    def sub(old: bytes, new: bytes, count: int = 1):
        return lambda raw: _resealed(raw.replace(old, new, count))

    return {
        "entries-again-later": lambda raw: _resealed(raw.replace(b',"%s"' % DIGEST_KEY.encode(),
                                                                 b',"entries":[],"%s"' % DIGEST_KEY.encode())),
        "entries-key-escaped-later": lambda raw: _resealed(raw.replace(b'"meta":', b'"entr\\u0069es":[],"meta":')),
        "entries-in-meta-first": lambda raw: _resealed(raw.replace(b'"entries":', b'"meta":{"entries":[]},"entries":')),
        "checksum-leading-zero": sub(b'"checksums":[', b'"checksums":[0'),
        "checksum-float": sub(b'"checksums":[', b'"checksums":[1.5,'),
        "checksum-too-big": sub(b'"checksums":[', b'"checksums":[18446744073709551616,'),
        "checksum-spaced": sub(b'"checksums":[', b'"checksums":[ '),
        "entry-added": sub(b'"entries":[', b'"entries":[{"name":"x"},'),
        "offset-float": sub(b'"offset":64,', b'"offset":64.0,'),
        "not-json-after": lambda raw: _resealed(raw.replace(b'"meta":{', b'"meta":{,')),
        "no-change": lambda raw: raw,
    }


@pytest.mark.parametrize("name", sorted(_text_edits()))
def test_matched_entry_text_gives_what_the_full_parse_gives(name):
    cache = EntryCache()
    Manifest.from_json(_manifest(1).to_json(), cache)
    Manifest.from_json(_manifest(2).to_json(), cache)
    raw = _text_edits()[name](_manifest(3, salt=5).to_json())
    full = _same_as_the_full_check(raw, cache)
    if name == "no-change":
        assert full is not None
        assert cache.parse(raw) is not None  # the matched path itself, not the fallback
        assert cache.parse(raw)[1] == full.entries


@pytest.mark.parametrize("name", sorted(_type_changes()))
def test_compact_edits_refuse_exactly_what_the_full_check_refuses(name):
    _refuses_as_the_full_check(name, _spliced)


# ---- the manifest's text ----------------------------------------------------------------------


def test_rendered_entries_make_the_same_text():
    m = _manifest(3)
    pieces = [e.json_pieces() for e in m.entries]
    bare = dataclasses.replace(m, entries=tuple(dataclasses.replace(e, checksums=()) for e in m.entries))
    raw = bare.to_json(render_entries(entries_template(pieces), [e.checksums for e in m.entries]))
    assert raw == m.to_json()
    assert Manifest.from_json(raw) == m
    odd = dataclasses.replace(m.entries[0], name='model/"checksums":[]%s%%\u00e9', checksums=(1, 2))
    head, tail = odd.json_pieces()
    assert json.loads(head + "1,2" + tail)["checksums"] == [1, 2]
    assert json.loads(head + tail)["name"] == odd.name
    text = render_entries(entries_template([odd.json_pieces(), m.entries[1].json_pieces()]), [(1, 2), (7,)])
    seven = dataclasses.replace(m.entries[1], checksums=(7,))
    assert text == json.dumps([odd.to_json(), seven.to_json()], separators=(",", ":"))


def test_layout_cache_reuses_only_equal_specs():
    cache = LayoutCache()
    first = cache.get(_specs())
    assert cache.get(list(first.specs)) is first
    changed = _specs()
    changed[1] = EntrySpec("model/b", "buffer", "int64", (9,))
    assert cache.get(changed) is not first and cache.get(changed).total > first.total


# ---- the trainer's EncodeCache, against a real daemon ------------------------------------------


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()


def _restored(socket_path: str, opt_kind=torch.optim.Adam) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(6, 3)
    opt = opt_kind(model.parameters(), lr=0.01)
    _train(model, opt)  # state to restore into
    snap = snapkit.snapshotter(socket_path, model, opt, job=JOB)
    try:
        assert snap.restore() > 0
    finally:
        snap.close()
    return model, opt


def _same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name, value in sa[k].items():
            other = sb[k][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.shape == other.shape, (k, name)
                assert value.numpy().tobytes() == other.numpy().tobytes(), (k, name)
            else:
                assert value == other, (k, name)


@pytest.mark.parametrize("change", ["replaced", "storage", "new_key", "scalar", "reshaped"])
def test_a_changed_optimizer_state_is_captured_not_the_cached_one(socket_path, change):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    snap = snapkit.snapshotter(socket_path, model, opt, job=JOB)
    try:
        snapkit.snap(snap, 1)
        snapkit.snap(snap, 2)  # the optimizer state's encoding is cached now
        per = opt.state[model.weight]
        if change == "replaced":  # a new tensor object under the same key
            per["exp_avg"] = torch.full_like(per["exp_avg"], 3.0)
        elif change == "storage":  # the same tensor object, new storage
            per["exp_avg"].set_(torch.full_like(per["exp_avg"], 5.0))
        elif change == "new_key":
            per["extra_buf"] = torch.arange(4.0)
        elif change == "scalar":
            per["note"] = 7
        else:
            per["exp_avg_sq"] = torch.ones(2, 9)
        snapkit.snap(snap, 3)
    finally:
        snap.close()
    if change == "reshaped":  # step 3 holds the new shape, which fits no model like this one: step 2 is restored
        model2 = nn.Linear(6, 3)
        opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
        _train(model2, opt2)
        snap2 = snapkit.snapshotter(socket_path, model2, opt2, job=JOB)
        try:
            assert snap2.restore() == 2
            assert 3 in snap2.stats.restore_unusable, snap2.stats.restore_unusable
        finally:
            snap2.close()
        return
    _, restored = _restored(socket_path)
    _same_state(opt, restored)


def test_cached_steps_restore_bit_exact_and_follow_new_parameters(socket_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    snap = snapkit.snapshotter(socket_path, model, opt, job=JOB)
    try:
        for step in range(1, 4):
            _train(model, opt)
            snapkit.snap(snap, step)
        old = model[0].weight  # a new parameter object under the same name, keeping its optimizer state
        model[0].weight = nn.Parameter(torch.full((3, 6), 0.25))
        opt.param_groups[0]["params"][0] = model[0].weight
        opt.state[model[0].weight] = opt.state.pop(old)
        _train(model, opt)
        snapkit.snap(snap, 4)
    finally:
        snap.close()
    model2 = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    _train(model2, opt2)
    snapkit.restore_and_compare(socket_path, model, model2, opt2, job=JOB, step=4)
    _same_state(opt, opt2)


def test_encode_cache_reuses_the_optimizer_encoding_only_while_it_holds():
    model = nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt)
    cache = state.EncodeCache()

    def encoded() -> state.Captured:
        return state.encode(state.freeze(1, model, opt, None, None), model, opt, cache)

    first, second = encoded(), encoded()
    assert second.meta["optim"]["state"] is first.meta["optim"]["state"]
    assert [s for s in second.specs] == [s for s in first.specs]
    assert all(a is b for a, b in zip(first.specs, second.specs))
    opt.state[model.bias]["exp_avg"] = torch.zeros(3)
    third = encoded()
    assert third.meta["optim"]["state"] is not first.meta["optim"]["state"]
    assert third.meta["optim"]["state"] == first.meta["optim"]["state"]
    assert any(src is opt.state[model.bias]["exp_avg"] or src._base is opt.state[model.bias]["exp_avg"]
               or src.data_ptr() == opt.state[model.bias]["exp_avg"].data_ptr() for src in third.sources)


@pytest.mark.parametrize("slice_bytes", [1 << 20, 7, 1])
def test_raw_depth_counts_across_slices(monkeypatch, slice_bytes):
    import ftd.manifest as manifest

    monkeypatch.setattr(manifest, "DEPTH_SLICE", slice_bytes)
    texts = ['[]', '"a[b"', '[[["]]]\\\\"]]]', '{"a": "\\\\\\"[", "b": [[{}]]}', '[{"x":"]]]]"},[[[1]]]]',
             '["\\u005b", {"k\\"": [[]]}]', '[' * 70 + ']' * 70, _manifest(1).to_json().decode()]
    for text in texts:
        assert manifest.raw_depth(text.encode()) == manifest.json_depth(json.loads(text)), text
