"""A lost node that is not replaced: one survivor decodes its data so the job can go on without it.

When torchrun re-forms a job with fewer nodes (`--nnodes=MIN:MAX`, no spare), the new ranks
reshard the old world's newest step that the job still holds whole (ftd.daemon.worlds). Ranks
of a node that is gone are decoded from the erasure code by **one** survivor of its group, the
*adopter*: the lowest-indexed member that is up (each survivor computes the same one from its
peer table). It runs the rebuild's decoding with the lost node as target (ftd.daemon.rebuild)
and seals the lost ranks' segments of that step in its own store as `Source.ADOPTED`: out of its
own node blob, served to peers like any sealed segment, held under the store's budget checks.
Memory: the lost node's data of that step once, on the adopter (transiently twice, while the
decoded blob is copied into segments).

`Adoptions` runs each adoption once per (step, node), on its own thread; other survivors ask
for it over the bulk plane (`bulkmsg.Adopt`) and poll the same call. Every outcome is a log
line and `ftd_adoptions_total{outcome}`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ftd._proto import peer_pb2 as pb
from ftd.daemon.groups import Group
from ftd.daemon.links import PeerLink
from ftd.daemon.peers import PeerTable
from ftd.daemon.rebuild import RebuildInputs, Rebuilder
from ftd.daemon.slots import Source
from ftd.daemon.store import SegmentStore
from ftd.errors import FtdError, RequestRejected
from ftd.metrics import DaemonMetrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30.0
"""A failed adoption is answered as failed for this long before a request starts it again."""


@dataclass(frozen=True)
class AdoptionState:
    """Where one adoption stands: "running", "done" or "failed"."""

    state: str
    ranks: tuple[int, ...] = ()
    data_bytes: int = 0
    seconds: float = 0.0
    error: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"state": self.state, "ranks": list(self.ranks), "bytes": self.data_bytes,
                           "seconds": self.seconds, "error": self.error[:2000]}).encode()

    @classmethod
    def from_doc(cls, doc: dict) -> AdoptionState:
        state = doc.get("state")
        ranks = doc.get("ranks", [])
        if state not in ("running", "done", "failed") or not isinstance(ranks, list) or not all(
                type(r) is int and r >= 0 for r in ranks):
            raise FtdError("peer sent a malformed adoption state")
        return cls(state, tuple(ranks), int(doc.get("bytes") or 0), float(doc.get("seconds") or 0.0),
                   str(doc.get("error") or ""))


class LocalLink:
    """This node's own pieces, read through its bulk reader, for a decode that runs here."""

    def __init__(self, read: Callable[[dict, int, int], bytes]):
        self._read = read

    def get(self, key: dict, offset: int, length: int, timeout: float) -> bytes:
        try:
            return self._read(key, offset, length)
        except (KeyError, ValueError, OSError) as exc:
            raise FtdError(f"this node cannot read its own {key.get('kind')}: {exc}") from exc

    def get_range(self, key: dict, offset: int, length: int, into: memoryview | bytearray, timeout: float) -> None:
        view = memoryview(into)
        try:
            view[:length] = self._read(key, offset, length)
        except (KeyError, ValueError, OSError) as exc:
            raise FtdError(f"this node cannot read its own piece {key}: {exc}") from exc


class Adoptions:
    """Decodes lost group members' data of a step into this node's store, once per (step, node)."""

    def __init__(self, me: int, group: Group, inputs: RebuildInputs, table: PeerTable, store: SegmentStore,
                 own_inventory: Callable[[], pb.Inventory], read_own: Callable[[dict, int, int], bytes],
                 metrics: DaemonMetrics):
        self.me, self.group, self.table, self.store, self.metrics = me, group, table, store, metrics
        local = LocalLink(read_own)
        links = inputs.links
        self._inputs = replace(inputs, links=lambda node: local if node == me else links(node))  # type: ignore[arg-type,return-value]
        self._own_inventory = own_inventory
        self._states: dict[tuple[int, int], AdoptionState] = {}
        self._ended: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()

    def adopter(self, lost: int) -> int:
        """The member that decodes `lost`'s data: the lowest-indexed member of the group that is up."""
        up = {s.node for s in self.table.states() if s.up} | {self.me}
        return min(n for n in self.group.members if n in up and n != lost)

    def request(self, job: str, step: int, node: int) -> AdoptionState:
        """Start decoding (step, node) here unless it runs or ran; its state now. RequestRejected when the
        node is not a lost member of this group, or this node's job is another."""
        if job != self.store.config.job:
            raise RequestRejected(f"this daemon serves job {self.store.config.job!r}, not {job!r}")
        if node == self.me or node not in self.group.members:
            raise RequestRejected(f"node {node} is not another member of group {list(self.group.members)}")
        with self._lock:
            state = self._states.get((step, node))
            if state is not None and (state.state != "failed" or time.monotonic() - self._ended.get(
                    (step, node), 0.0) < RETRY_AFTER_S):
                return state
            self._states[(step, node)] = AdoptionState("running")
        threading.Thread(target=self._run, args=(step, node), name=f"ftd-adopt-{node}", daemon=True).start()
        return AdoptionState("running")

    def state(self, step: int, node: int) -> AdoptionState | None:
        with self._lock:
            return self._states.get((step, node))

    def wait(self, step: int, node: int, deadline: float) -> AdoptionState:
        """Poll the local adoption of (step, node) until it ends or `deadline` (monotonic) passes."""
        while True:
            state = self.state(step, node)
            if state is None or state.state != "running" or time.monotonic() >= deadline:
                return state or AdoptionState("failed", error="not started")
            time.sleep(0.05)

    def _run(self, step: int, node: int) -> None:
        t0 = time.perf_counter()
        try:
            self._wait_down(node)
            invs = {n: inv for n, inv in self.table.inventories().items()}
            invs[self.me] = self._own_inventory()
            log.info("decoding lost node %d's data of step %d here (the job goes on without it)", node, step)
            data = Rebuilder(self._inputs, target=node, source=Source.ADOPTED).adopt_step(step, invs)
            ranks = tuple(sorted({h.rank for h in self.store.holdings()
                                  if h.step == step and h.source == Source.ADOPTED.value}))
            seconds = time.perf_counter() - t0
            state = AdoptionState("done", ranks, data, seconds)
            self.metrics.adoptions.labels("adopted").inc()
            self.metrics.adopted_bytes.inc(data)
            log.info("adopted lost node %d's ranks %s of step %d: %d bytes decoded in %.2f s", node, list(ranks),
                     step, data, seconds)
        except Exception as exc:  # noqa: BLE001 - a thread never dies silently: the state says why
            state = AdoptionState("failed", error=f"{type(exc).__name__}: {exc}",
                                  seconds=time.perf_counter() - t0)
            self.metrics.adoptions.labels("failed").inc()
            log.error("decoding lost node %d's data of step %d failed: %s", node, step, exc)
        with self._lock:
            self._states[(step, node)] = state
            self._ended[(step, node)] = time.monotonic()


    def _wait_down(self, node: int) -> None:
        """A member that another survivor found unreachable is decoded once this node's peer table marks it
        down too (a heartbeat timeout later at most); one that stays up is not decoded."""
        deadline = time.monotonic() + 2 * self.table.peer_timeout + 1.0
        while any(s.node == node and s.up for s in self.table.states()):
            if time.monotonic() > deadline:
                raise RequestRejected(f"node {node} is up: its data is not decoded elsewhere")
            time.sleep(0.1)


def ask(link: PeerLink, job: str, step: int, node: int, deadline: float, timeout: Callable[[], float]
        ) -> AdoptionState:
    """Ask the adopter behind `link` to decode (step, node) and poll it until it ends or `deadline`."""
    from ftd.daemon.bulkmsg import Adopt, read_padded

    while True:
        state = AdoptionState.from_doc(read_padded(link, Adopt(job, step, node), "adoption state", timeout()))
        if state.state != "running" or time.monotonic() >= deadline:
            return state
        time.sleep(0.1)
