"""Another world size from memory, daemon side (ftd.daemon.worlds, ftd.daemon.adoption): EC nodes in one
process (tests/unit/ecnodes.py) with real stores, peer gRPC and the in-process bulk fabric."""

from __future__ import annotations

import time

import pytest

from ftd.daemon.worlds import WorldCatalog
from ftd.errors import RequestRejected
from tests.unit.ecnodes import JOB, Cluster, held_bytes, metric, state_bytes

pytestmark = pytest.mark.timeout(90)




def _catalog(c: Cluster, node: int) -> WorldCatalog:
    ec = c.nodes[node]
    return WorldCatalog(JOB, ec.store, ec.group_view())


def test_a_lost_node_is_decoded_by_one_survivor_and_its_ranks_are_offered(cluster_of) -> None:
    c = cluster_of(4, "3+1")
    c.seal(4, world_size=4)
    c.wait_protected(4)
    c.seal(5, nodes=[0, 1, 2], world_size=4)  # newer, but node 3 never sealed it: only step 4 can be made whole
    c.lose(3)
    c.wait("node 3 marked down", lambda: all(not s.up for n in (0, 1, 2) for s in c.nodes[n].table.states()
                                             if s.node == 3))
    deadline = time.monotonic() + 30
    assert _catalog(c, 2).whole_steps(3, decode=False, deadline=deadline) == []  # nothing decoded yet
    whole = _catalog(c, 2).whole_steps(3, decode=True, deadline=deadline)
    assert [(w.step, w.world_size) for w in whole] == [(4, 4)]
    assert {r: (h.node, h.source) for r, h in whole[0].ranks.items()} == {
        0: (0, "local"), 1: (1, "local"), 2: (-1, "local"), 3: (0, "adopted")}  # node 0 is the adopter
    data, _ = held_bytes(c.nodes[0].store, 3, 4)
    assert data == state_bytes(3, 4, len(data))
    assert metric(c.nodes[0], "ftd_adoptions_total", {"outcome": "adopted"}) == 1
    # A second survivor asking again is answered from the same adoption: nothing is decoded twice.
    again = _catalog(c, 1).whole_steps(3, decode=True, deadline=deadline)
    assert again[0].ranks[3].node == 0
    assert metric(c.nodes[0], "ftd_adoptions_total", {"outcome": "adopted"}) == 1
    # Byte ranges of the adopted segment, read by another survivor over the bulk plane.
    piece = c.nodes[2].peer_read(0, JOB, 3, 4, 1000, 5000)
    assert piece == data[1000:6000]
    assert not c.nodes[1].store.holdings() or all(h.source != "adopted" for h in c.nodes[1].store.holdings())


def test_a_grown_world_finds_every_old_rank_on_the_peers(cluster_of) -> None:
    c = cluster_of(4, "3+1")
    c.seal(7, nodes=[0, 1, 2], world_size=3)  # node 3 is new: it holds nothing of the 3-rank world
    c.wait("node 3 sees its peers", lambda: len(c.nodes[3].table.inventories()) == 3)
    deadline = time.monotonic() + 20
    whole = _catalog(c, 3).whole_steps(4, decode=True, deadline=deadline)
    assert [(w.step, w.world_size) for w in whole] == [(7, 3)]
    assert {r: h.node for r, h in whole[0].ranks.items()} == {0: 0, 1: 1, 2: 2}
    assert _catalog(c, 3).whole_steps(3, decode=True, deadline=deadline) == []  # that world's own steps are not listed
    assert metric(c.nodes[0], "ftd_adoptions_total", {"outcome": "adopted"}) == 0


def test_a_step_missing_ranks_of_a_live_node_is_not_whole(cluster_of) -> None:
    c = cluster_of(3, "2+1")
    c.seal(3, nodes=[0, 1], world_size=3)  # node 2 is up but never sealed: nothing to decode, nothing whole
    assert _catalog(c, 0).whole_steps(2, decode=True, deadline=time.monotonic() + 10) == []
    with pytest.raises(RequestRejected):
        c.nodes[0].adoptions.request("another-job", 3, 2)
    with pytest.raises(RequestRejected):
        c.nodes[0].adoptions.request(JOB, 3, 0)  # itself
