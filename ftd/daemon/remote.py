"""Find a rank's snapshot wherever the group holds it, and fetch it from that peer.

When a node is replaced, torchrun may give its ranks other numbers, so a rank can restart on a
node whose daemon never held its snapshots. Its daemon then lists the steps its group peers
report for that rank (heartbeat inventories) and, on Open, pulls the sealed segment and its
manifest over the bulk plane (size first, then payload: ftd.daemon.bulkmsg), verifies it
against the manifest's checksums and seals it locally (source FETCHED, reported as "peers"),
so the rank restores as if it were local. The serving side is ftd.daemon.serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ftd import knobs
from ftd.daemon.bulkmsg import Segment, SegmentManifest, read_sized
from ftd.daemon.groups import Group
from ftd.daemon.links import PeerLink
from ftd.daemon.peers import PeerTable
from ftd.daemon.slots import Source
from ftd.daemon.store import SegmentStore
from ftd.errors import FtdError, NotFound
from ftd.manifest import Manifest

log = logging.getLogger(__name__)


class PeerFetcher:
    """Steps of a rank that group peers hold, and fetching one of them into this node's store."""

    def __init__(self, group: Group, table: PeerTable, links: Callable[[int], PeerLink], store: SegmentStore,
                 timeout: Callable[[], float]):
        self.group, self.table, self.links, self.store, self._timeout = group, table, links, store, timeout

    def holders(self, rank: int) -> dict[int, list[int]]:
        """Peer node -> steps it holds for `rank` (from the newest heartbeats of peers that are up)."""
        return {node: sorted(s.step for s in inv.steps) for node, inv in self.table.inventories().items()
                if rank in inv.ranks and inv.steps}

    def steps(self, rank: int) -> list[int]:
        """Every step of `rank` some peer holds."""
        return sorted({step for steps in self.holders(rank).values() for step in steps})

    def fetch(self, job: str, rank: int, step: int, world_size: int = 0) -> None:
        """Pull (rank, step) from a peer that holds it and seal it here; NotFound when no peer does, or (with
        `world_size`) when the peer's is of another world size: that one is resharded, never moved whole."""
        nodes = [node for node, steps in self.holders(rank).items() if step in steps]
        # A segment is part of a node blob: no peer may make this node allocate more than the largest
        # blob of that step any (authenticated) inventory announced.
        limit = max((s.blob_bytes for inv in self.table.inventories().values() for s in inv.steps if s.step == step),
                    default=0)
        if not nodes:
            raise NotFound(f"no peer of group {list(self.group.members)} holds rank {rank} step {step}")
        errors = []
        for node in nodes:
            t0 = time.perf_counter()
            link = self.links(node)
            timeout = self._timeout()  # a dead peer costs the peer timeout, then the next one is tried
            try:
                manifest = read_sized(link, SegmentManifest(job, rank, step), knobs.get().max_manifest_bytes,
                                      "manifest", timeout)
                if world_size and Manifest.from_json(bytes(manifest)).world_size != world_size:
                    raise NotFound(f"node {node}'s rank {rank} step {step} was taken by another world size than "
                                   f"{world_size}")
                data = read_sized(link, Segment(job, rank, step), limit,
                                  "segment (larger than any blob of the step)", timeout)
                self.store.install_sealed(rank, step, bytes(manifest), memoryview(data), source=Source.FETCHED)
            except NotFound:
                raise
            except FtdError as exc:
                errors.append(f"node {node}: {exc}")
                log.warning("fetching rank %d step %d from node %d failed: %s", rank, step, node, exc)
                continue
            seconds = time.perf_counter() - t0
            log.info("fetched rank %d step %d from node %d in %.2f s (%d bytes)", rank, step, node, seconds,
                     len(data))
            return
        raise NotFound(f"rank {rank} step {step} could not be fetched from any peer: {'; '.join(errors)}")
