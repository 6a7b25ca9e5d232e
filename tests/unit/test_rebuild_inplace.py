"""Rebuild decodes straight into reserved segments: batches that straddle the blob header and a segment's
end, a decoded segment that fails its manifest refused and freed, nothing sealed from unverified bytes.
Real stores, the in-process bulk fabric of tests/unit/ecnodes.py."""

from __future__ import annotations

import pytest

from ftd import knobs
from ftd.daemon.slots import SlotState, Source
from ftd.errors import NotFound, SnapshotCorrupt
from tests.unit.ecnodes import held_bytes, metric, state_bytes
from tests.unit.storekit import JOB, _store
from tests.unit.test_store_install import _payload

pytestmark = pytest.mark.timeout(90)


def test_small_batches_straddling_header_and_segment_end_rebuild_bit_exact(cluster_of) -> None:
    # 3 stripes a batch, not a divisor of the chunk: batches cross the header's and the segment's bounds
    with knobs.override(rebuild_batch_bytes=12 << 10, stripe_bytes=4 << 10):
        c = cluster_of(3, "2+1", state_bytes=200_001)
        c.seal(2)
        c.wait_protected(2)
        before, _ = held_bytes(c.nodes[2].store, 2, 2)
        replacement = c.replace(2)
        data, source = held_bytes(replacement.store, 2, 2)
    assert bytes(data) == bytes(before) == state_bytes(2, 2, len(data))
    assert source == "peers"
    assert metric(replacement, "ftd_rebuilds_total", {"outcome": "rebuilt"}) == 1


def test_a_reserved_segment_that_fails_its_manifest_is_refused_and_freed(tmp_path) -> None:
    store = _store(tmp_path)
    manifest_json, data = _payload(0, 3)
    pending = store.reserve_install(0, 3, len(data))
    view = pending.view()
    view[:] = data
    view[100] ^= 0xFF  # one flipped byte, as a lying peer would decode it
    view.release()
    with pytest.raises(SnapshotCorrupt):
        pending.seal(manifest_json, Source.REBUILT)
    pending.release()
    with pytest.raises(NotFound):
        store.open(JOB, 0, 3)
    assert all(s.state is SlotState.FREE for s in store._slots[0])


def test_a_reserved_segment_written_in_place_seals_like_an_install(tmp_path) -> None:
    store = _store(tmp_path)
    manifest_json, data = _payload(1, 4)
    pending = store.reserve_install(1, 4, len(data))
    with pending.view() as view:
        view[:] = data
    pending.seal(manifest_json, Source.REBUILT)
    pending.release()  # a no-op once sealed
    path, _, got_manifest, source = store.open(JOB, 1, 4)
    assert got_manifest == manifest_json and source == "peers"  # how a rebuilt segment is reported
    with open(path, "rb") as f:
        assert memoryview(f.read(len(data))) == memoryview(data)
