"""Heartbeats across EC groups: every node learns (and pins) the steps other groups protect or encode."""

from __future__ import annotations

from ftd._proto import peer_pb2 as pb
from ftd.config import DaemonConfig
from ftd.daemon.groups import ECShape, plan_groups
from ftd.daemon.peers import HeartbeatLoop, Membership, PeerServer, PeerServicer, PeerTable, slim
from ftd.demo.procs import free_port_pair
from ftd.metrics import DaemonMetrics

TOKEN = "unit-test-token-0123456789"


def _membership(peers: tuple[str, ...], me: int) -> Membership:
    shape = ECShape.parse("1+1")
    return Membership(peers, me, shape, tuple(plan_groups(len(peers), shape)))


def _inventory(node: int, protected: int, encoding: int) -> pb.Inventory:
    return pb.Inventory(job="j", node=node, incarnation=node + 1, protected_step=protected, encoding_step=encoding,
                        steps=[pb.StepData(step=s, blob_bytes=4096) for s in (protected, encoding)], ranks=[node])


def test_other_groups_get_a_slim_heartbeat_and_their_steps_are_pinned():
    peers = tuple(f"127.0.0.1:{free_port_pair()}" for _ in range(4))  # groups {0, 1} and {2, 3}
    node0, node2 = _membership(peers, 0), _membership(peers, 2)
    assert node0.group.members != node2.group.members
    table0, table2 = PeerTable(node0, DaemonMetrics(), 5.0), PeerTable(node2, DaemonMetrics(), 5.0)
    received: list[pb.Inventory] = []

    class Recording(PeerServicer):
        def Heartbeat(self, request, context):  # noqa: N802 - the gRPC method name
            received.append(request.inventory)
            return super().Heartbeat(request, context)

    server = PeerServer(node2.listen_addresses(f"127.0.0.1:{peers[2].rsplit(':', 1)[1]}")[0],
                        Recording(node2, table2, "j", lambda: _inventory(2, 40, 41)), TOKEN, "j", DaemonMetrics())
    loop = HeartbeatLoop(node0, table0, TOKEN, "j", 0.2, lambda: _inventory(0, 30, 33))
    try:
        loop.beat_once()
    finally:
        loop.stop()
        server.stop()
    assert received and not received[0].steps and received[0].protected_step == 30  # slim: no step list
    assert table2.other_groups_steps() == {30, 33}
    assert table0.other_groups_steps() == {40, 41}
    assert table2.inventories() == {}  # node 0 is not in node 2's group: no liveness, no EC decisions


def test_slim_inventory_and_out_of_range_nodes():
    full = _inventory(1, 5, -1)
    assert slim(full).protected_step == 5 and not slim(full).steps and not slim(full).ranks
    peers = ("a:1", "b:1", "c:1", "d:1")
    table = PeerTable(_membership(peers, 0), DaemonMetrics(), 5.0)
    table.seen(_inventory(9, 7, 8))  # not a node of this cluster: ignored
    table.seen(_inventory(3, 12, -1))  # other group: -1 (not encoding) is not a step
    assert table.other_groups_steps() == {12}


def test_config_roundtrip_of_one_group_has_no_outside():
    cfg = DaemonConfig.load(environ={"FTD_CLUSTER_TOKEN": "t"}, peers="a:1,b:1,c:1", ec="2+1", node="0")
    m = Membership.from_config(cfg)
    assert m is not None and len(m.groups) == 1
    table = PeerTable(m, DaemonMetrics(), 5.0)
    table.seen(_inventory(1, 3, 4))  # a group peer: it is in the table, not an outside pin
    assert table.other_groups_steps() == set() and set(table.inventories()) == {1}


def test_parity_of_steps_newer_than_the_protected_one_is_kept(tmp_path):
    """A rotation record that arrives before any inventory mentions its step must survive the next
    clean-up, or the step becomes protected with that rotation's record only on its coordinator."""
    from ftd.daemon.parity import ParityStore, RotationRecord
    from ftd import knobs
    from ftd.daemon.protection import parity_steps_to_keep

    store = ParityStore(tmp_path)
    for step in (10, 13, 17):
        store.put_record(RotationRecord(step, 0, "isal", 2, 1, 4096, 4096, [0, 1, 2], [[1, 0], [2, 0]], [0],
                                        [[0], [0], [0]]))
    store.drop_except(parity_steps_to_keep(13, store.steps()))  # step 13 just became protected
    assert store.steps() == {13, 17}
    store.record(17, 0)  # still readable by a replacement
    assert parity_steps_to_keep(5, set(range(100))) == {5, *range(100 - knobs.get().unprotected_kept, 100)}


def test_a_restarted_daemon_claims_only_steps_every_rotation_encoded(tmp_path):
    """Records of some rotations of a step (its other coordinators never encoded it) do not make it
    protected: a replacement would be sent to rebuild a step that lacks a rotation."""
    from ftd.daemon.parity import ParityStore, RotationRecord

    store = ParityStore(tmp_path)

    def record(step: int, rot: int) -> RotationRecord:
        return RotationRecord(step, rot, "isal", 2, 1, 4096, 4096, [0, 1, 2], [[1, 0], [2, 0]], [0], [[0], [0], [0]])

    for rot in range(3):
        store.put_record(record(20, rot))
    store.put_record(record(25, 0))
    store.put_record(record(25, 1))
    assert store.whole_steps(3) == {20}
    store.put_record(record(25, 2))
    assert store.whole_steps(3) == {20, 25}
