"""Peer membership, heartbeats and the peer gRPC service (proto/ftd/v1/peer.proto).

`Membership` says who is in the cluster and in this node's EC group; `PeerTable` remembers the
newest inventory and liveness of every group peer (and wakes whoever listens when one arrives);
`HeartbeatLoop` exchanges inventories on a fixed interval, or at once when nudged, and marks a
peer down when it misses `peer_timeout` (logged and exported; it destroys nothing). Every call
and every reply is signed with the cluster token over its exact bytes (ftd/daemon/auth.py), and
every inventory is validated (`check_inventory`) before it is believed: a process without the
token answering on a peer's address is ignored.

Nodes of *other* groups get a slim heartbeat too (protected and encoding step only): a restore
needs one step that every rank holds, and after a node loss its group can only give back the
step it protected, so every node keeps the steps that any group protects or is encoding.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from ftd._proto import peer_pb2 as pb
from ftd._proto import peer_pb2_grpc as pb_grpc
from ftd.config import DaemonConfig
from ftd.daemon import auth
from ftd.daemon.groups import ECShape, Group, group_of, plan_groups
from ftd.errors import ConfigError
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

HEARTBEAT_METHOD = "/ftd.v1.Peer/Heartbeat"
MAX_INVENTORY_RANKS = 4096
MAX_INVENTORY_STEPS = 256
MAX_INVENTORY_PARITY = 4096
MAX_BLOB_BYTES = 1 << 40
"""Largest node blob an inventory may announce (1 TiB); the memory budget bounds parity further."""
MAX_STEP = (1 << 62)


class BadInventory(ValueError):
    """An inventory that breaks the bounds or the shape of the cluster."""


def check_inventory(inv: pb.Inventory, membership: Membership, job: str, node: int) -> pb.Inventory:
    """`inv` when it is a plausible inventory of node `node` of this job; BadInventory otherwise."""
    if inv.job != job:
        raise BadInventory(f"inventory of job {inv.job[:64]!r}, this is job {job!r}")
    if inv.node != node:
        raise BadInventory(f"inventory says node {inv.node}, it came from node {node}")
    if len(inv.ranks) > MAX_INVENTORY_RANKS or len(inv.steps) > MAX_INVENTORY_STEPS \
            or len(inv.parity) > MAX_INVENTORY_PARITY:
        raise BadInventory(f"inventory of node {node} is too long ({len(inv.ranks)} ranks, {len(inv.steps)} steps, "
                           f"{len(inv.parity)} parity chunks)")
    if any(not -1 <= v <= MAX_STEP for v in (inv.protected_step, inv.encoding_step, inv.target_step,
                                              inv.candidate_step, inv.newest_step)):
        raise BadInventory(f"inventory of node {node}: step out of range")
    if any(r < 0 for r in inv.ranks) or len(set(inv.ranks)) != len(inv.ranks):
        raise BadInventory(f"inventory of node {node}: negative or repeated ranks")
    steps = [s.step for s in inv.steps]
    if len(set(steps)) != len(steps) or any(not 0 <= s <= MAX_STEP for s in steps):
        raise BadInventory(f"inventory of node {node}: repeated or out-of-range steps")
    if any(not 0 < s.blob_bytes <= MAX_BLOB_BYTES for s in inv.steps):
        raise BadInventory(f"inventory of node {node}: a blob size outside (0, {MAX_BLOB_BYTES}]")
    group = membership.group
    if node in group.members:
        keys = {(p.step, p.rotation, p.j) for p in inv.parity}
        if len(keys) != len(inv.parity) or any(
                not 0 <= p.step <= MAX_STEP or not 0 <= p.rotation < group.size or not 0 <= p.j < group.m
                or not 0 < p.chunk_bytes <= MAX_BLOB_BYTES for p in inv.parity):
            raise BadInventory(f"inventory of node {node}: parity entries outside the group's shape")
    elif inv.steps or inv.parity or inv.ranks or inv.rebuilding:
        raise BadInventory(f"node {node} of another group sent more than a slim inventory")
    return inv


def split_host_port(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ConfigError(f"peer entry {entry!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Membership:
    """The cluster as this node sees it: ordered peer endpoints, its own index, its group."""

    peers: tuple[str, ...]
    me: int
    shape: ECShape
    groups: tuple[Group, ...]

    @classmethod
    def from_config(cls, config: DaemonConfig) -> Membership | None:
        peers = tuple(config.peer_list)
        if not peers:
            return None
        for entry in peers:
            split_host_port(entry)
        shape = ECShape.parse(config.ec)
        return cls(peers, _find_me(config.node, peers), shape, tuple(plan_groups(len(peers), shape)))

    @property
    def group(self) -> Group:
        return group_of(self.me, list(self.groups))

    @property
    def position(self) -> int:
        return self.group.position(self.me)

    def grpc_target(self, node: int) -> str:
        return self.peers[node]

    def data_endpoint(self, node: int) -> str:
        host, port = split_host_port(self.peers[node])
        return f"tcp://{host}:{port + 1}"

    def listen_addresses(self, listen: str) -> tuple[str, str]:
        """(gRPC bind address, zmq bind endpoint) of this node."""
        host, port = split_host_port(listen or f"0.0.0.0:{split_host_port(self.peers[self.me])[1]}")
        return f"{host}:{port}", f"tcp://{host}:{port + 1}"


def _find_me(node: str, peers: tuple[str, ...]) -> int:
    if node.isdigit():
        index = int(node)
        if index >= len(peers):
            raise ConfigError(f"node index {index} is outside the {len(peers)}-entry peer list")
        return index
    names = [node, socket.gethostname()]
    for name in names:
        for i, entry in enumerate(peers):
            host = split_host_port(entry)[0]
            if name in (entry, host) or host.split(".")[0] == name:
                return i
    raise ConfigError(f"node {node!r} is not in the peer list {list(peers)}; set FTD_NODE to its index")


@dataclass
class PeerState:
    """What this node knows of one peer."""

    node: int
    up: bool = False
    last_seen: float = 0.0
    inventory: pb.Inventory | None = None
    incarnation: int = 0


@dataclass
class PeerTable:
    """Liveness and newest inventory of every group peer. Thread-safe."""

    membership: Membership
    metrics: DaemonMetrics
    peer_timeout: float
    _peers: dict[int, PeerState] = field(default_factory=dict)
    _outside: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (protected, encoding)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _nudged: threading.Event = field(default_factory=threading.Event)
    _listeners: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for node in self.membership.group.members:
            if node != self.membership.me:
                self._peers[node] = PeerState(node)

    def on_seen(self, listener: Callable[[], None]) -> None:
        """Call `listener` (quick, never raising) after each group peer's inventory arrives."""
        self._listeners.append(listener)

    def nudge(self) -> None:
        """Ask the heartbeat loop to beat now rather than at its next interval (this node's
        inventory changed in a way the group waits for: a target, a candidate, new parity)."""
        self._nudged.set()

    def wait_nudge(self, timeout: float) -> None:
        """Sleep until `timeout` passes or `nudge()` is called (then clear the nudge)."""
        self._nudged.wait(timeout)
        self._nudged.clear()

    def seen(self, inventory: pb.Inventory) -> None:
        self._seen(inventory)
        if inventory.node in self._peers:
            for listener in self._listeners:
                listener()

    def _seen(self, inventory: pb.Inventory) -> None:
        with self._lock:
            state = self._peers.get(inventory.node)
            if state is None:
                if inventory.node != self.membership.me and 0 <= inventory.node < len(self.membership.peers):
                    self._outside[inventory.node] = (inventory.protected_step, inventory.encoding_step)
                return
            if state.incarnation and inventory.incarnation != state.incarnation:
                log.warning("peer %d restarted (new incarnation)", inventory.node)
            state.inventory, state.incarnation, state.last_seen = inventory, inventory.incarnation, time.monotonic()
            if not state.up:
                state.up = True
                log.info("peer %d is up", inventory.node)
                self.metrics.peer_up.labels(str(inventory.node)).set(1)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for state in self._peers.values():
                if state.up and now - state.last_seen > self.peer_timeout:
                    state.up = False
                    log.warning("peer %d is down: no heartbeat for %.1f s", state.node, now - state.last_seen)
                    self.metrics.peer_up.labels(str(state.node)).set(0)

    def other_groups_steps(self) -> set[int]:
        """Steps nodes of other groups last said they protect or encode (kept even when they go down:
        a lost node's group can give back only its protected step, so the rest of the job keeps it)."""
        with self._lock:
            return {s for pair in self._outside.values() for s in pair if s >= 0}

    def inventories(self) -> dict[int, pb.Inventory]:
        """Newest inventory of every peer that is up."""
        with self._lock:
            return {n: s.inventory for n, s in self._peers.items() if s.up and s.inventory is not None}

    def states(self) -> list[PeerState]:
        with self._lock:
            return [PeerState(s.node, s.up, s.last_seen, s.inventory, s.incarnation) for s in self._peers.values()]


class PeerServicer(pb_grpc.PeerServicer):
    """Answers heartbeats of group peers (auth is enforced by the interceptor)."""

    def __init__(self, membership: Membership, table: PeerTable, job: str,
                 inventory: Callable[[], pb.Inventory]):
        self.membership, self.table, self.job, self.inventory = membership, table, job, inventory

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        inv = request.inventory
        if inv.job != self.job:
            log.warning("refused heartbeat from node %d of job %r (this is job %r)", inv.node, inv.job, self.job)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this node serves job {self.job!r}, not {inv.job!r}")
        if not 0 <= inv.node < len(self.membership.peers) or inv.node == self.membership.me:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {inv.node} is not a peer of node "
                          f"{self.membership.me} ({len(self.membership.peers)} nodes)")
        caller = auth.current_caller()
        try:
            check_inventory(inv, self.membership, self.job, caller if caller >= 0 else inv.node)
        except BadInventory as exc:
            log.warning("refused a heartbeat: %s", exc)
            self.table.metrics.peer_refused.inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.table.seen(inv)
        mine = self.inventory()
        return pb.HeartbeatReply(inventory=mine if inv.node in self.membership.group.members else slim(mine))


def slim(inventory: pb.Inventory) -> pb.Inventory:
    """What nodes of other groups need of an inventory: who, and which steps to keep."""
    return pb.Inventory(job=inventory.job, node=inventory.node, incarnation=inventory.incarnation,
                        protected_step=inventory.protected_step, encoding_step=inventory.encoding_step)


class PeerServer:
    """The TCP gRPC server of the peer service, with HMAC authentication."""

    def __init__(self, address: str, servicer: PeerServicer, token: str, job: str, metrics: DaemonMetrics):
        interceptor = auth.AuthInterceptor(token, job, servicer.membership.me, lambda reason: metrics.peer_refused.inc())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="ftd-peer-rpc"),
                                  interceptors=[interceptor], options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_PeerServicer_to_server(servicer, self.server)
        why = "the address is in use or not local"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises here when the port is taken
            self.port, why = 0, str(exc)
        if self.port == 0:
            self.server.stop(0)
            raise ConfigError(f"cannot listen for peers on {address} ({why}); set FTD_LISTEN, or this node's "
                              f"entry of FTD_PEERS, to a free host:port")
        self.server.start()
        log.info("peer service on %s", address)

    def stop(self) -> None:
        self.server.stop(1).wait(2)


class HeartbeatLoop:
    """Thread `ftd-heartbeat`: sends this node's inventory to every group peer (a slim one to every
    other node) each interval, and at once when `PeerTable.nudge()` is called."""

    def __init__(self, membership: Membership, table: PeerTable, token: str, job: str, interval: float,
                 inventory: Callable[[], pb.Inventory]):
        self.membership, self.table, self.token, self.job = membership, table, token, job
        self.interval, self.inventory = interval, inventory
        self._channels = {n: grpc.insecure_channel(membership.grpc_target(n), options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)])
            for n in range(len(membership.peers)) if n != membership.me}
        self._calls = {n: auth.SignedCaller(c, HEARTBEAT_METHOD, token, job, membership.me)
                       for n, c in self._channels.items()}
        self._stop = threading.Event()
        self._distrusted: set[int] = set()
        self.errors = 0  # beats that failed with an unexpected exception (also ftd_thread_errors_total)
        self._thread = threading.Thread(target=self._run, name="ftd-heartbeat", daemon=True)

    def start(self) -> HeartbeatLoop:
        self._thread.start()
        return self

    def beat_once(self, group_only: bool = False) -> None:
        """One heartbeat to every peer (`group_only`: to group peers only, as a nudged beat is)."""
        inventory = self.inventory()
        full, outside = pb.HeartbeatRequest(inventory=inventory), pb.HeartbeatRequest(inventory=slim(inventory))
        group = self.membership.group.members
        timeout = max(0.5, self.interval * 2)
        # All peers at once: one that accepts and never answers costs one timeout, not one per peer.
        pending = {node: call.start(full if node in group else outside, pb.HeartbeatReply, node, timeout)
                   for node, call in self._calls.items() if node in group or not group_only}
        for node, finish in pending.items():
            try:
                reply = finish()
                check_inventory(reply.inventory, self.membership, self.job, node)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                    log.error("peer %d refused this node: %s", node, exc.details())
                continue
            except (PermissionError, BadInventory, DecodeError) as exc:
                self._distrust(node, str(exc))
                continue
            self.table.seen(reply.inventory)
        self.table.expire()

    def _distrust(self, node: int, reason: str) -> None:
        """A reply that is not node `node`'s, or not a valid inventory: believe nothing of it."""
        first = node not in self._distrusted
        self._distrusted.add(node)
        log.log(logging.WARNING if first else logging.DEBUG, "ignored a heartbeat reply from %s (node %d): %s",
                self.membership.peers[node], node, reason)
        self.table.metrics.peer_refused.inc()

    def _run(self) -> None:
        last = ""
        next_full = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            full = now >= next_full  # nudged beats in between go to the group only
            if full:
                next_full = now + self.interval
            try:
                self.beat_once(group_only=not full)
                last = ""
            except Exception as exc:  # noqa: BLE001 - the heartbeat thread must outlive any one beat
                self.errors += 1
                self.table.metrics.thread_errors.labels("ftd-heartbeat").inc()
                message = f"{type(exc).__name__}: {exc}"
                if message != last:
                    log.error("heartbeat failed (the thread goes on): %s", message, exc_info=True)
                last = message
            self.table.wait_nudge(max(0.0, next_full - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self.table.nudge()
        if self._thread.is_alive():
            self._thread.join(5)
        for channel in self._channels.values():
            channel.close()
