"""Protection, rebuild and remote fetch of EC groups in one process (tests/unit/ecnodes.py): real stores and
peer gRPC, the in-process bulk fabric; nodes lost, corrupt pieces, slow and unreachable peers."""

from __future__ import annotations

import os
import time

import pytest

from ftd import knobs
from ftd.daemon.sources import RecoveryChain
from ftd.errors import NotFound
from tests.unit.ecnodes import JOB, Cluster, held_bytes, metric, state_bytes

pytestmark = pytest.mark.timeout(90)




def _segment_path(cluster: Cluster, node: int, step: int) -> str:
    return cluster.nodes[node].store.open(JOB, node, step)[0]


def test_a_step_sealed_everywhere_becomes_protected_on_every_node(cluster_of) -> None:
    c = cluster_of(3, "2+1")
    for step in (1, 2, 3):
        c.seal(step)
    c.wait_protected(3)
    for node, ec in c.nodes.items():
        held = {(s, r, j) for s, r, j, _ in ec.parity.held()}
        assert {(3, rot, 0) for rot in range(3)} & held, (node, held)  # m=1: every node holds parity 0 of one rotation
        assert ec.status().protected_step == 3
        assert metric(ec, "ftd_newest_protected_step") == 3
        assert metric(ec, "ftd_ec_encode_bytes_total") > 0
        assert metric(ec, "ftd_seal_to_protected_seconds_count") >= 1


def test_a_lost_node_is_rebuilt_bit_exact_from_its_peers(cluster_of) -> None:
    c = cluster_of(3, "2+1")
    c.seal(4)
    c.wait_protected(4)
    before, _ = held_bytes(c.nodes[1].store, 1, 4)
    replacement = c.replace(1)
    data, source = held_bytes(replacement.store, 1, 4)
    assert data == before == state_bytes(1, 4, len(data))
    assert source == "peers"
    assert metric(replacement, "ftd_rebuilds_total", {"outcome": "rebuilt"}) == 1
    assert metric(replacement, "ftd_rebuilt_step") == 4
    assert replacement.protector.protected_step == 4
    # the rebuilt node protects new steps with the others
    c.seal(5)
    c.wait_protected(5)


def test_a_corrupt_piece_is_refused_and_another_survivor_used(cluster_of) -> None:
    c = cluster_of(4, "2+2")
    c.seal(6)
    c.wait_protected(6)
    original, _ = held_bytes(c.nodes[3].store, 3, 6)
    c.lose(3)
    with open(_segment_path(c, 0, 6), "r+b") as f:  # a survivor's data rots after it was encoded
        f.seek(1000)
        f.write(os.urandom(64))
    replacement = c.replace(3)
    data, _ = held_bytes(replacement.store, 3, 6)
    assert data == original
    assert metric(replacement, "ftd_checksum_failures_total", {"kind": "data"}) >= 1


def test_losing_more_than_m_nodes_is_reported_unrecoverable(cluster_of) -> None:
    c = cluster_of(3, "2+1", rebuild_wait=1.0)
    c.seal(2)
    c.wait_protected(2)
    c.lose(2)
    replacement = c.replace(1)
    assert metric(replacement, "ftd_rebuilds_total", {"outcome": "unrecoverable"}) == 1
    assert metric(replacement, "ftd_rebuilt_step") == -1
    with pytest.raises(NotFound):
        replacement.store.open(JOB, 1, 2)
    t0 = time.monotonic()  # a rank there is told at once that nothing is held: it starts fresh, nothing hangs
    assert RecoveryChain(replacement.store, replacement).steps(JOB, 1, deadline=_soon()) == []
    assert time.monotonic() - t0 < 3.0


def test_a_slow_peer_past_the_timeout_is_skipped_for_another(cluster_of) -> None:
    c = cluster_of(4, "2+2")
    c.seal(3)
    c.wait_protected(3)
    original, _ = held_bytes(c.nodes[0].store, 0, 3)
    c.fabric.delay(1, 5.0)  # node 1 answers heartbeats but its bulk plane stalls past the transfer timeout
    with knobs.override(transfer_timeout=0.5):
        replacement = c.replace(0)
    data, _ = held_bytes(replacement.store, 0, 3)
    assert data == original
    assert metric(replacement, "ftd_rebuilds_total", {"outcome": "rebuilt"}) == 1


def test_a_slow_peer_within_the_timeout_is_waited_for(cluster_of) -> None:
    c = cluster_of(3, "2+1")
    c.fabric.delay(2, 0.05)
    c.seal(1)
    c.wait_protected(1)
    assert c.fabric.served(2) > 0  # its chunks were read, slowly, not skipped


def test_a_rank_that_moved_is_fetched_from_the_peer_that_holds_it(cluster_of) -> None:
    c = cluster_of(3, "2+1")
    c.seal(7)
    c.wait_protected(7)
    here = c.nodes[2]
    chain = RecoveryChain(here.store, here)
    c.wait("node 0's inventory at node 2", lambda: 7 in here.steps(0))
    assert 7 in chain.steps(JOB, 0, deadline=_soon())
    opened = chain.open(JOB, 0, 7, deadline=_soon())
    assert opened.source == "peers"
    data, _ = held_bytes(here.store, 0, 7)
    assert data == held_bytes(c.nodes[0].store, 0, 7)[0]
    assert metric(here, "ftd_peer_received_bytes_total", {"peer": "0"}) >= len(data)


def test_a_fetch_from_an_unreachable_or_corrupt_peer_fails_cleanly(cluster_of) -> None:
    c = cluster_of(3, "2+1")
    c.seal(8)
    c.wait_protected(8)
    here = c.nodes[1]
    c.wait("node 0's inventory at node 1", lambda: 8 in here.steps(0))
    c.fabric.cut(0)
    with knobs.override(transfer_timeout=0.3), pytest.raises(NotFound, match="could not be fetched from any peer"):
        here.fetch(JOB, 0, 8)
    c.fabric.cut(0, False)
    with open(_segment_path(c, 0, 8), "r+b") as f:  # the holder's copy rots: the fetched bytes fail their checksums
        f.seek(10)
        f.write(os.urandom(32))
    with pytest.raises(NotFound, match="could not be fetched"):
        here.fetch(JOB, 0, 8)
    with pytest.raises(NotFound):
        here.store.open(JOB, 0, 8)  # nothing half-installed
    with pytest.raises(NotFound, match="no peer"):
        here.fetch(JOB, 0, 99)


def _soon() -> float:
    return time.monotonic() + 10.0
