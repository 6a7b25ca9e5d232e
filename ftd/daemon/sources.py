"""The daemon's recovery sources, asked in order: local memory, then the node's redundancy.

`List` and `Open` of the snapshot service call this chain and nothing else. `steps()` is the
union of what every source holds for a rank, so after a node is replaced every rank can agree
on the newest step some source holds; `open()` serves a step from local memory, or has the
first source that holds it bring it into local memory (fetch from a peer) and serves it then.
The source a rank restored from travels with the opened segment (`Opened.source`, from the
segment's own `Source`, kept across daemon restarts). The durable tier (ftd.daemon.persist),
when configured, is the last source, after the peers.

Waiting lives here, bounded by the caller's deadline: while this node rebuilds its memory from
its peers nothing is listed, and while a peer rebuilds (it may be the node that will hold the
rank) the listing waits for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from ftd.daemon.redundancy import Redundancy
from ftd.daemon.store import SegmentStore
from ftd.errors import FtdError, NotFound

log = logging.getLogger(__name__)


class DurableSource(Protocol):
    """The durable tier as a recovery source (ftd.daemon.persist.Persister)."""

    def steps(self, rank: int, world_size: int = 0) -> list[int]: ...

    def fetch(self, job: str, rank: int, step: int) -> None: ...


class NotReady(FtdError):
    """This node is still rebuilding its snapshots from its peers."""


@dataclass(frozen=True)
class Opened:
    """A sealed segment ready to be mapped by its rank."""

    path: str
    capacity: int
    manifest_json: bytes
    source: str
    """Where the rank's state came from: "local", "peers", ..."""


class RecoveryChain:
    """Local memory first, then each further source in order."""

    def __init__(self, store: SegmentStore, redundancy: Redundancy, durable: DurableSource | None = None):
        self.store, self.redundancy, self.durable = store, redundancy, durable

    def wait_ready(self, deadline: float) -> None:
        """Return once this node holds what it will hold (a rebuild has run); NotReady at `deadline`."""
        if self.redundancy.wait_ready(0):
            return
        log.info("a rank asked for its snapshots while this node rebuilds; holding the call")
        if not self.redundancy.wait_ready(deadline - time.monotonic()):
            raise NotReady("this node is still rebuilding its snapshots from peers")

    def steps(self, job: str, rank: int, deadline: float, world_size: int = 0) -> list[int]:
        """Every step of `rank` some source holds (durable ones of `world_size` only, when it is given)."""
        self.wait_ready(deadline)
        local = self.store.list_steps(job, rank, world_size)
        if not self.redundancy.wait_for_peers(deadline - time.monotonic()):
            log.warning("a peer is still rebuilding; answering with what the group holds now")
        elsewhere = sorted(set(self.redundancy.steps(rank)) - set(local))
        if elsewhere:
            log.info("rank %d: steps %s here, %s on %s", rank, local, elsewhere, self.redundancy.name)
        durable = (sorted(set(self.durable.steps(rank, world_size)) - set(local) - set(elsewhere))
                   if self.durable else [])
        if durable:
            log.info("rank %d: steps %s in the durable tier", rank, durable)
        return sorted(set(local) | set(elsewhere) | set(durable))

    def open(self, job: str, rank: int, step: int, deadline: float, world_size: int = 0) -> Opened:
        """(rank, step) from the first source that holds it; NotFound when none does. With `world_size`, a
        peer's copy of another world size is not fetched (the rank reshards it instead)."""
        self.wait_ready(deadline)
        try:
            return Opened(*self.store.open(job, rank, step))
        except NotFound:
            pass
        try:
            self.redundancy.fetch(job, rank, step, world_size)
        except NotFound:
            if self.durable is None:
                raise
            self.durable.fetch(job, rank, step)
        return Opened(*self.store.open(job, rank, step))
