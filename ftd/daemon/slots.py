"""The life of one shared-memory segment: a small, pure state machine.

    FREE ──begin──▶ WRITING ──commit──▶ SEALED ──evict/discard──▶ FREE
                       └──abort/superseded──▶ FREE

A sealed segment is immutable until it is evicted; only FREE segments are handed out, so a
copy in progress never touches a sealed step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import FtdError


class SlotState(enum.Enum):
    FREE = "free"
    WRITING = "writing"
    SEALED = "sealed"


_ALLOWED = {
    (SlotState.FREE, SlotState.WRITING),
    (SlotState.WRITING, SlotState.SEALED),
    (SlotState.WRITING, SlotState.FREE),
    (SlotState.SEALED, SlotState.FREE),
}


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
    unfilled: bool = False  # created, its pages not yet allocated and touched
    filling: bool = False  # being pre-faulted in the background: not to be handed out yet
    rebuilt: bool = False  # sealed by a rebuild from peers, not by a local rank
    foreign: bool = False  # fetched for a rank that moved here: another node's data, not part of this node's blob

    @property
    def manifest_path(self) -> Path:
        return self.path.with_suffix(".manifest.json")

    def begin(self, step: int, lease: int, now: float) -> None:
        self._move(SlotState.WRITING)
        self.step, self.lease, self.begun_at = step, lease, now

    def seal(self, manifest_json: bytes, sealed_at_ns: int) -> None:
        self._move(SlotState.SEALED)
        self.manifest_json, self.lease, self.sealed_at_ns = manifest_json, None, sealed_at_ns

    def adopt_sealed(self, step: int, manifest_json: bytes, sealed_at_ns: int) -> None:
        """Take over a segment found sealed on disk (daemon restart)."""
        self.begin(step, 0, 0.0)
        self.seal(manifest_json, sealed_at_ns)

    def release(self) -> None:
        self._move(SlotState.FREE)
        self.step = self.lease = self.manifest_json = None
        self.sealed_at_ns = self.data_bytes = 0
        self.run = ""
        self.rebuilt = self.foreign = False

    def _move(self, new: SlotState) -> None:
        if (self.state, new) not in _ALLOWED:
            raise IllegalTransition(f"{self.path.name}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
