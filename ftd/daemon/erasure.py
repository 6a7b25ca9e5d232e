"""Erasure coding across an EC group of peers: the `Redundancy` of a node with FTD_PEERS.

This module only assembles the parts and answers the Redundancy interface:

* the peer plane (ftd.daemon.peers): membership, heartbeats, the peer table, the peer service;
* the bulk plane (ftd.daemon.bulk), ZeroMQ unless a transport is given (unit tests pass an
  in-process one), with this node's reader/writer (ftd.daemon.serving) and links to peers;
* the protection loop (ftd.daemon.protection) with its encoder and rebuild;
* remote fetch of a rank's snapshot from a peer (ftd.daemon.remote);
* for a job re-formed on another world size: what the peers hold, byte ranges of their segments
  and the decoding of a lost member's data by one survivor (ftd.daemon.worlds.GroupView,
  ftd.daemon.adoption).
"""

from __future__ import annotations

import logging
import secrets
import time

from ftd.codec import Codec
from ftd.config import DaemonConfig
from ftd.daemon import adoption
from ftd.daemon.adoption import Adoptions
from ftd.daemon.bulk import BulkTransport
from ftd.daemon.bulkmsg import Holdings, Segment, SegmentManifest, read_padded, read_sized
from ftd.daemon.encoder import Encoder
from ftd.daemon.links import Links
from ftd.daemon.parity import ParityStore
from ftd.daemon.peers import HeartbeatLoop, Membership, PeerServer, PeerServicer, PeerTable
from ftd.daemon.protection import Protector
from ftd.daemon.rebuild import RebuildInputs
from ftd.daemon.redundancy import PeerReport, RedundancyStatus
from ftd.daemon.remote import PeerFetcher
from ftd.daemon.serving import BulkService
from ftd.daemon.store import Holding, SegmentStore
from ftd.daemon.transport import ZmqTransport, curve_keys
from ftd.errors import FtdError
from ftd import knobs
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)


class ErasureCoding:
    """A node's protection by its EC group: encoding, rebuild, serving peers and fetching from them."""

    name = "peers"

    def __init__(self, config: DaemonConfig, membership: Membership, store: SegmentStore, codec: Codec,
                 metrics: DaemonMetrics, transport: BulkTransport | None = None):
        self.config, self.membership, self.store, self.codec, self.metrics = config, membership, store, codec, metrics
        me, group = membership.me, membership.group
        self.group = group
        self.parity = ParityStore(store.root, admit=self._admit_parity, mode=store.dir_mode)
        store.count_external(self.parity.held_bytes)  # the memory budget covers segments and parity alike
        self.table = PeerTable(membership, metrics, config.peer_timeout)
        grpc_addr, data_addr = membership.listen_addresses(config.listen)
        if transport is None:
            transport = ZmqTransport(data_addr, membership.data_endpoint, curve_keys(config.cluster_token),
                                     max_chunk=knobs.get().bulk_max_chunk,
                                     on_error=lambda: metrics.thread_errors.labels("ftd-bulk-server").inc(),
                                     encrypt=config.bulk_encrypt)
        self.transport = transport
        self.links = Links(me, transport.connect, metrics)
        self.service = BulkService(me, group, membership.position, store, self.parity, self.table, metrics,
                                   own_steps=lambda: self.protector.complete_steps(),
                                   accept_record=lambda record: self.protector.accept_record(record),
                                   adopt=lambda job, step, node: self.adoptions.request(job, step, node).to_json())
        encoder = Encoder(me, group, codec, self.parity, self.links, metrics,
                          accept_record=lambda record: self.protector.accept_record(record),
                          timeout=self.transfer_timeout)
        rebuild = RebuildInputs(me, group, codec, self.table, self.links, store, self.parity, metrics,
                                config.rebuild_wait, self.transfer_timeout)
        self.protector = Protector(me, group, config.job, secrets.randbits(63), store, self.parity, self.table,
                                   self.service, encoder, rebuild, metrics,
                                   other_groups_steps=self.table.other_groups_steps)
        self.fetcher = PeerFetcher(group, self.table, self.links, store, self.transfer_timeout)
        self.adoptions = Adoptions(me, group, rebuild, self.table, store, self.protector.inventory, self.service.read,
                                   metrics)
        transport.serve(self.service.read, self.service.write)
        try:
            self.peer_server = PeerServer(grpc_addr, PeerServicer(membership, self.table, config.job,
                                                                  self.protector.inventory),
                                          config.cluster_token, config.job, metrics)
        except BaseException:
            transport.close()  # the bulk port is free again for the next start
            raise
        self.heartbeat = HeartbeatLoop(membership, self.table, config.cluster_token, config.job,
                                       config.heartbeat_interval, self.protector.inventory)

    # ---- life ---------------------------------------------------------------------------------

    def start(self) -> ErasureCoding:
        self.protector.start()
        self.heartbeat.start()
        g = self.group
        log.info("node %d in EC group %d %s (%d+%d, codec %s); newest protected step %d", self.membership.me,
                 g.index, list(g.members), g.k, g.m, self.codec.name, self.protector.protected_step)
        return self

    def stop(self) -> None:
        self.protector.stop()
        self.heartbeat.stop()
        self.peer_server.stop()
        self.transport.close()
        self.links.close()
        self.service.close()
        self.parity.close()

    # ---- Redundancy ---------------------------------------------------------------------------

    def notify_sealed(self, rank: int, step: int) -> None:
        self.protector.notify_sealed()

    def wait_ready(self, timeout: float) -> bool:
        return self.protector.ready.wait(max(0.0, timeout))

    def wait_for_peers(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while any(inv.rebuilding for inv in self.table.inventories().values()):
            if time.monotonic() > deadline:
                return False
            time.sleep(knobs.get().peer_poll_interval)
        return True

    def steps(self, rank: int) -> list[int]:
        return self.fetcher.steps(rank)

    def fetch(self, job: str, rank: int, step: int, world_size: int = 0) -> None:
        self.fetcher.fetch(job, rank, step, world_size)

    def group_view(self) -> ErasureCoding:
        return self

    # ---- GroupView (ftd.daemon.worlds): another world size ---------------------------------------

    def peer_holdings(self, job: str) -> dict[int, list[Holding]]:
        out: dict[int, list[Holding]] = {}
        for node in sorted(self.table.inventories()):
            try:
                doc = read_padded(self.links(node), Holdings(job), "holdings", self.transfer_timeout())
                rows = doc.get("holdings")
                if not isinstance(rows, list):
                    raise FtdError("peer sent malformed holdings")
                out[node] = [_holding(row) for row in rows]
            except (FtdError, TypeError, ValueError) as exc:
                log.warning("node %d's holdings are not available: %s", node, exc)
        return out

    def lost_members(self, answered: set[int]) -> dict[int, tuple[int, ...]]:
        return {s.node: tuple(s.inventory.ranks) if s.inventory is not None else () for s in self.table.states()
                if not s.up or s.node not in answered}

    def decode_lost(self, job: str, step: int, node: int, deadline: float) -> None:
        adopter = self.adoptions.adopter(node)
        if adopter == self.membership.me:
            self.adoptions.request(job, step, node)
            state = self.adoptions.wait(step, node, deadline)
        else:
            log.info("asking node %d to decode lost node %d's data of step %d", adopter, node, step)
            state = adoption.ask(self.links(adopter), job, step, node, deadline, self.transfer_timeout)
        if state.state != "done":
            raise FtdError(f"node {adopter} could not decode node {node}'s data of step {step}: "
                           f"{state.error or state.state}")

    def peer_manifest(self, node: int, job: str, rank: int, step: int) -> bytes:
        return bytes(read_sized(self.links(node), SegmentManifest(job, rank, step), knobs.get().max_manifest_bytes,
                                "manifest", self.transfer_timeout()))

    def peer_read(self, node: int, job: str, rank: int, step: int, offset: int, length: int) -> bytes:
        if node not in self.group.members or node == self.membership.me:
            raise FtdError(f"node {node} is not a peer of group {list(self.group.members)}")
        buf = bytearray(length)
        if length:
            self.links(node).get_range(Segment(job, rank, step).key(), offset, length, memoryview(buf),
                                       self.transfer_timeout())
        return bytes(buf)

    def status(self) -> RedundancyStatus:
        state = self.protector.view()
        now = time.monotonic()
        peers = []
        for peer in self.table.states():
            inv = peer.inventory
            peers.append(PeerReport(
                node=peer.node, endpoint=self.membership.peers[peer.node], up=peer.up,
                protected_step=inv.protected_step if inv else -1, rebuilding=bool(inv and inv.rebuilding),
                seconds_since_heartbeat=now - peer.last_seen if peer.last_seen else -1,
                ranks=tuple(inv.ranks) if inv else (), steps=tuple(s.step for s in inv.steps) if inv else (),
                parity_chunks=len(inv.parity) if inv else 0))
        g = self.group
        return RedundancyStatus(node_index=self.membership.me, scheme=f"{g.k}+{g.m}", group=tuple(g.members),
                                protected_step=state.protected_step, rebuilding=state.rebuilding, peers=tuple(peers))

    # ---- limits -------------------------------------------------------------------------------

    def transfer_timeout(self) -> float:
        """Longest stall of one bulk transfer: a dead peer costs at most the peer timeout."""
        return min(knobs.get().transfer_timeout, max(1.0, self.config.peer_timeout))

    def _admit_parity(self, nbytes: int) -> None:
        """Refuse a parity allocation that would take segments plus parity over the memory budget, or
        leave the host under the memory reserve (what the store enforces for segments)."""
        if nbytes <= 0:
            return
        reserve = self.config.memory_reserve
        if reserve > 0:
            import psutil

            available = psutil.virtual_memory().available
            if available - nbytes < reserve:
                self.metrics.refused.labels("parity_reserve").inc()
                raise FtdError(f"parity of {nbytes} bytes would leave {available - nbytes} bytes of host memory "
                               f"available, under the reserve of {reserve}")
        budget = self.config.memory_budget
        if budget <= 0:
            return
        held = self.store.held_bytes() + self.parity.held_bytes()
        if held + nbytes > budget:
            self.metrics.refused.labels("parity_budget").inc()
            raise FtdError(f"parity of {nbytes} bytes would exceed the memory budget ({held} of {budget} bytes held "
                           f"in segments and parity)")


def _holding(row: object) -> Holding:
    """One row of a peer's holdings, checked."""
    if not (isinstance(row, list) and len(row) == 5 and all(type(v) is int and v >= 0 for v in row[:3])
            and isinstance(row[3], str) and type(row[4]) is int and row[4] >= 0):
        raise ValueError("malformed holdings row")
    return Holding(row[0], row[1], row[2], row[3][:16], row[4])
