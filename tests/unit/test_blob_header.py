"""A node blob's header (what a rebuild decodes from its peers' pieces) is parsed with bounds."""

from __future__ import annotations

import json
import struct

import pytest

from ftd.daemon.blob import NodeBlob, parse_header
from ftd.errors import ManifestError


def _framed(body: bytes, total_pad: int = 4096) -> bytes:
    return struct.pack("<Q", len(body)) + body + bytes(total_pad)


def test_a_real_header_round_trips(tmp_path):
    seg = tmp_path / "a.seg"
    seg.write_bytes(b"x" * 100)
    blob = NodeBlob(7, 2, [(3, str(seg), 100, b'{"m":1}')])
    step, node, parts = parse_header(blob.header, blob.size)
    assert (step, node) == (7, 2)
    assert [(p.rank, p.offset, p.nbytes, p.manifest_json) for p in parts] == \
        [(b.rank, b.offset, b.nbytes, b.manifest_json) for b in blob.parts]


@pytest.mark.parametrize("body, message", [
    (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    (b"[1, 2]", "malformed blob header"),
    (b"not json", "not valid JSON"),
    (json.dumps({"format": 1, "step": 1, "node": 0, "ranks": [{"rank": 0}]}).encode(), "malformed blob header"),
    (json.dumps({"format": 99}).encode(), "unknown blob format"),
], ids=["deep", "not-an-object", "not-json", "missing-keys", "other-format"])
def test_a_hostile_header_is_a_manifest_error(body: bytes, message: str):
    raw = _framed(body)
    with pytest.raises(ManifestError, match=message):
        parse_header(raw, len(raw))


def test_a_part_outside_the_blob_is_refused():
    body = json.dumps({"format": 1, "step": 1, "node": 0,
                       "ranks": [{"rank": 0, "offset": 8, "nbytes": 10, "manifest": "{}"}]}).encode()
    raw = _framed(body)
    with pytest.raises(ManifestError, match="outside the blob"):
        parse_header(raw, len(raw))
