"""The life of one shared-memory segment: a small, pure state machine, and where its data came from.

    NEW ──prefault──▶ PREFAULTING ──prefaulted──▶ FREE ◀──────────────────┐
     │                                             │                       │ release (abort, superseded,
     │                                           begin                     │ reaped, evicted, discarded)
     │                                             ▼                       │
     └────────────begin (install_sealed)──────▶ WRITING ──seal──▶ SEALED ──┤
                                                   └───────────────────────┘

- NEW: the file is created and sized, its pages not yet allocated or touched.
- PREFAULTING: its pages are being allocated and zeroed outside the store lock, by the
  background thread `ftd-prealloc-<rank>` or by the Begin that got this segment. Nobody else
  hands it out, reaps, evicts or deletes it; it ends FREE (the Begin then takes it at once).
- NEW ──begin──▶ WRITING: `install_sealed` takes a never-touched segment; its copy touches the
  pages it needs, so there is nothing to prefault.
- FREE: ready to be handed out. WRITING: leased to one writer (a trainer, or lease 0 for the
  daemon's own `install_sealed` copy). SEALED: immutable until evicted (released) or discarded.

Only FREE segments are handed out, so a copy in progress never touches a sealed step. Every
move happens under the store lock; an edge the machine lacks raises IllegalTransition and
changes nothing.

`Source` says where a sealed segment's data came from: a local rank's Commit (LOCAL), a rebuild
of this node from its peers (REBUILT), or a fetch for a rank that moved here (FETCHED).
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import FtdError


class SlotState(enum.Enum):
    NEW = "new"
    PREFAULTING = "prefaulting"
    FREE = "free"
    WRITING = "writing"
    SEALED = "sealed"


_ALLOWED = {
    (SlotState.NEW, SlotState.PREFAULTING),
    (SlotState.PREFAULTING, SlotState.FREE),
    (SlotState.NEW, SlotState.WRITING),
    (SlotState.FREE, SlotState.WRITING),
    (SlotState.WRITING, SlotState.SEALED),
    (SlotState.WRITING, SlotState.FREE),
    (SlotState.SEALED, SlotState.FREE),
}


class Source(enum.Enum):
    """Where a sealed segment's data came from; carried on the slot and persisted beside the segment."""

    LOCAL = "local"  # sealed by a Commit of a rank on this node
    REBUILT = "rebuilt"  # rebuilt from peers as this node's own data (erasure decoding)
    FETCHED = "fetched"  # fetched for a rank that moved here: another node's data
    DURABLE = "durable"  # read back from the durable tier (ftd.durable)
    ADOPTED = "adopted"  # a lost node's data decoded here for a job that goes on without it (ftd.daemon.adoption)

    @property
    def recovery_source(self) -> str:
        """What a restore of this segment reports on the wire: "local", "peers" or "durable"."""
        return {Source.LOCAL: "local", Source.DURABLE: "durable"}.get(self, "peers")

    @property
    def in_node_blob(self) -> bool:
        """Part of this node's blob (what EC protects); fetched data stays with the node that sealed it, and a
        step read back from the durable tier is protected there."""
        return self not in (Source.FETCHED, Source.DURABLE, Source.ADOPTED)


class IllegalTransition(FtdError):
    """A slot was asked to move along an edge the state machine does not have."""


@dataclass
class Slot:
    """One segment file and what it currently holds."""

    path: Path
    capacity: int
    state: SlotState = SlotState.FREE
    step: int | None = None
    lease: int | None = None
    manifest_json: bytes | None = None
    begun_at: float = 0.0
    sealed_at_ns: int = 0  # orders retention: the most recently sealed survive, whatever their step
    data_bytes: int = 0  # bytes the sealed manifest covers
    run: str = ""  # run identity in the sealed manifest: another run's steps are evicted first
    world_size: int = 0  # world size in the sealed manifest (0: not sealed)
    source: Source = Source.LOCAL  # where the sealed data came from; LOCAL unless sealed

    @property
    def manifest_path(self) -> Path:
        return self.path.with_suffix(".manifest.json")

    @property
    def source_path(self) -> Path:
        """The small private file holding `source` while a non-local segment is sealed (absent: LOCAL)."""
        return self.path.with_suffix(".source")

    def prefault(self) -> None:
        """NEW -> PREFAULTING: its pages are about to be touched outside the store lock."""
        self._move(SlotState.PREFAULTING)

    def prefaulted(self) -> None:
        """PREFAULTING -> FREE: every page is in; it may be handed out."""
        self._move(SlotState.FREE, only_from=(SlotState.PREFAULTING,))

    def begin(self, step: int | None, lease: int, now: float) -> None:
        """FREE or NEW -> WRITING for (step, lease); lease 0 is the daemon's own write. Step None: leased
        ahead for a rank's next snapshot, whose Commit names the step (SegmentStore.lease_next)."""
        self._move(SlotState.WRITING)
        self.step, self.lease, self.begun_at = step, lease, now

    def seal(self, manifest_json: bytes, sealed_at_ns: int, source: Source = Source.LOCAL) -> None:
        self._move(SlotState.SEALED)
        self.manifest_json, self.lease, self.sealed_at_ns = manifest_json, None, sealed_at_ns
        self.source = source

    def adopt_sealed(self, step: int, manifest_json: bytes, sealed_at_ns: int,
                     source: Source = Source.LOCAL) -> None:
        """Take over a segment found sealed on disk (daemon restart)."""
        self.begin(step, 0, 0.0)
        self.seal(manifest_json, sealed_at_ns, source)

    def release(self) -> None:
        """WRITING or SEALED -> FREE, forgetting what it held."""
        self._move(SlotState.FREE, only_from=(SlotState.WRITING, SlotState.SEALED))
        self.step = self.lease = self.manifest_json = None
        self.sealed_at_ns = self.data_bytes = 0
        self.run = ""
        self.world_size = 0
        self.source = Source.LOCAL

    def _move(self, new: SlotState, only_from: Collection[SlotState] | None = None) -> None:
        """Take the edge state -> new; `only_from` narrows which edges into `new` the caller may take."""
        if (self.state, new) not in _ALLOWED or (only_from is not None and self.state not in only_from):
            raise IllegalTransition(f"{self.path.name}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
