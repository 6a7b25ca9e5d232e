"""Redundancy across nodes as a strategy behind one narrow interface (docs/ARCHITECTURE.md §5).

The snapshot servicer and the recovery chain (ftd.daemon.sources) know a node's redundancy only
through `Redundancy`: a sealed-step notification, whether it is ready (a replacement node
rebuilds first), which steps of a rank other nodes hold, fetching one of them, and a status.
`ErasureCoding` (ftd.daemon.erasure) is the implementation across an EC group of peers;
`NoRedundancy` is a node without peers. A durable tier or another scheme is one more class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ftd.errors import NotFound

if TYPE_CHECKING:
    from ftd.daemon.worlds import GroupView


@dataclass(frozen=True)
class PeerReport:
    """One peer as this node sees it (for `ftd status`)."""

    node: int
    endpoint: str
    up: bool
    protected_step: int
    rebuilding: bool
    seconds_since_heartbeat: float
    ranks: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    parity_chunks: int = 0


@dataclass(frozen=True)
class RedundancyStatus:
    """What a node's redundancy reports in the Status RPC."""

    node_index: int
    scheme: str
    group: tuple[int, ...]
    protected_step: int
    rebuilding: bool
    peers: tuple[PeerReport, ...] = field(default=())


class Redundancy(Protocol):
    """A node's protection of its snapshots by other nodes."""

    name: str
    """The recovery source a rank reports for steps restored through it (e.g. "peers")."""

    def start(self) -> Redundancy: ...

    def stop(self) -> None: ...

    def notify_sealed(self, rank: int, step: int) -> None:
        """A local rank sealed `step`."""

    def wait_ready(self, timeout: float) -> bool:
        """Wait until this node holds what it will hold (a rebuild has run); False on timeout."""

    def wait_for_peers(self, timeout: float) -> bool:
        """Wait until no other node is rebuilding (one may be the node that will hold a rank); False on timeout."""

    def steps(self, rank: int) -> list[int]:
        """Steps of `rank` that other nodes hold."""

    def fetch(self, job: str, rank: int, step: int, world_size: int = 0) -> None:
        """Bring (rank, step) into the local store; NotFound when no other node holds it (of `world_size`)."""

    def group_view(self) -> GroupView | None:
        """What resharding onto another world size reads from other nodes (None: nothing elsewhere)."""

    def status(self) -> RedundancyStatus | None:
        """The Status RPC's view, None when there is no redundancy."""


class NoRedundancy:
    """A node without peers: nothing elsewhere, always ready."""

    name = "none"

    def start(self) -> NoRedundancy:
        return self

    def stop(self) -> None:
        pass

    def notify_sealed(self, rank: int, step: int) -> None:
        pass

    def wait_ready(self, timeout: float) -> bool:
        return True

    def wait_for_peers(self, timeout: float) -> bool:
        return True

    def steps(self, rank: int) -> list[int]:
        return []

    def fetch(self, job: str, rank: int, step: int, world_size: int = 0) -> None:
        raise NotFound(f"rank {rank} step {step} is not held here and this node has no peers")

    def group_view(self) -> GroupView | None:
        return None

    def status(self) -> RedundancyStatus | None:
        return None
