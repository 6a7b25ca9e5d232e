"""Which steps of another world size the job's nodes hold whole: what a resharding rank plans from.

When torchrun re-forms the job with another number of nodes, a new rank asks its daemon
(`Worlds` RPC) for the old world's steps. The daemon gathers what every reachable node holds:
its own store and each group peer's (`bulkmsg.Holdings`), keyed by (step, world size). A step is
*whole* when every old rank's segment is held by a live node. When the newest steps are not
whole because a member of the group is down, its data of that step is decoded by the adopter
(ftd.daemon.adoption) — only a step the group protected can be. The answer lists the whole
steps, newest first, with every old rank's holder and manifest; the rank reads byte ranges
itself (local segments mapped, peers' through `ReadRanges`).

The recovery point is therefore the newest step the job holds whole: after a node is lost for
good that is the group's protected step, as for a node replacement; when nodes are added it is
the newest step the old world sealed everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from ftd.daemon.store import Holding, SegmentStore
from ftd.errors import FtdError

log = logging.getLogger(__name__)

MAX_STEPS = 2
"""Whole steps answered (newest first): the newest, and one to fall back to."""
MAX_DECODE_TRIES = 3
"""Steps newer than the newest whole one for which decoding a lost member is tried."""


class GroupView(Protocol):
    """What resharding needs from the node's group of peers (ftd.daemon.erasure.ErasureCoding)."""

    def peer_holdings(self, job: str) -> dict[int, list[Holding]]:
        """Node -> what it holds, for every group peer that is up and answers."""

    def lost_members(self, answered: set[int]) -> dict[int, tuple[int, ...]]:
        """Group members that are down or did not answer (not in `answered`) -> the ranks their last
        inventory named."""

    def decode_lost(self, job: str, step: int, node: int, deadline: float) -> None:
        """Have the adopter decode `node`'s data of `step`; FtdError when it cannot (by `deadline`)."""

    def peer_manifest(self, node: int, job: str, rank: int, step: int) -> bytes: ...

    def peer_read(self, node: int, job: str, rank: int, step: int, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class Holder:
    """Where an old rank's segment is: `node` -1 is this node."""

    node: int
    source: str


@dataclass
class WorldStep:
    """One step of an old world and who holds each of its ranks."""

    step: int
    world_size: int
    ranks: dict[int, Holder] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        return set(self.ranks) == set(range(self.world_size))

    def missing(self) -> set[int]:
        return set(range(self.world_size)) - set(self.ranks)


def collect(world_size: int, local: list[Holding], peers: dict[int, list[Holding]]) -> list[WorldStep]:
    """Steps of worlds other than `world_size`, newest first; a rank held here is preferred to a peer's copy,
    and among peers the lowest-indexed node."""
    steps: dict[tuple[int, int], WorldStep] = {}
    sources = [(-1, local)] + sorted(peers.items())
    for node, holdings in sources:
        for h in holdings:
            if h.world_size <= 0 or h.world_size == world_size or not 0 <= h.rank < h.world_size:
                continue
            ws = steps.setdefault((h.step, h.world_size), WorldStep(h.step, h.world_size))
            ws.ranks.setdefault(h.rank, Holder(node, h.source))
    return sorted(steps.values(), key=lambda w: (w.step, w.world_size), reverse=True)


class WorldCatalog:
    """Answers `Worlds`: the old world's whole steps, decoding a lost member's data when that makes one."""

    def __init__(self, job: str, store: SegmentStore, view: GroupView | None):
        self.job, self.store, self.view = job, store, view

    def whole_steps(self, world_size: int, decode: bool, deadline: float) -> list[WorldStep]:
        """The whole steps of other world sizes, newest first (at most MAX_STEPS)."""
        found, answered = self._collect(world_size)
        newest_whole = max((w.step for w in found if w.whole), default=-1)
        if decode and self.view is not None:
            lost = self.view.lost_members(answered)
            tries = [w for w in found if not w.whole and w.step > newest_whole][:MAX_DECODE_TRIES]
            for ws in tries:
                nodes = sorted(n for n, ranks in lost.items() if ws.missing() & set(ranks))
                if not nodes or not ws.missing() <= {r for n in nodes for r in lost[n]}:
                    continue  # what is missing is not on a lost member of this group: decoding cannot help
                try:
                    for node in nodes:
                        self.view.decode_lost(self.job, ws.step, node, deadline)
                except FtdError as exc:
                    log.warning("step %d of world %d cannot be made whole by decoding nodes %s: %s", ws.step,
                                ws.world_size, nodes, exc)
                    continue
                found, _ = self._collect(world_size)
                break
        whole = [w for w in found if w.whole][:MAX_STEPS]
        if whole:
            w = whole[0]
            log.info("world %d -> %d: step %d is held whole (ranks on nodes %s)", w.world_size, world_size, w.step,
                     sorted({h.node for h in w.ranks.values()}))
        return whole

    def _collect(self, world_size: int) -> tuple[list[WorldStep], set[int]]:
        peers = self.view.peer_holdings(self.job) if self.view is not None else {}
        return collect(world_size, self.store.holdings(), peers), set(peers)

    def manifest(self, holder: Holder, rank: int, step: int) -> bytes:
        if holder.node < 0:
            return self.store.open(self.job, rank, step)[2]
        assert self.view is not None
        return self.view.peer_manifest(holder.node, self.job, rank, step)
