"""A step's layout and its manifest's entry text, reused while the entries stay the same (ftd-copy-<rank>).

A training run captures the same entries every step (ftd.client.state.EncodeCache hands out the
same EntrySpec objects for them), so their offsets, their typed views of each segment and the
JSON of everything but their checksums are worked out once; a step only hashes its bytes and
fills the checksums in (`manifest.render_entries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ftd.manifest import Entry, EntrySpec, entries_template, layout


@dataclass
class LaidOut:
    """The entries of one list of specs at their offsets, `total` bytes, and what depends on nothing else."""

    specs: list[EntrySpec]
    entries: list[Entry]
    total: int
    template: str  # the entries' JSON, a %s for each one's checksums (manifest.entries_template)
    views: dict[str, tuple[object, list[torch.Tensor]]] = field(default_factory=dict)  # segment path -> its views


class LayoutCache:
    """The LaidOut of the last specs it was asked for; a new one when they differ (compared by value)."""

    def __init__(self) -> None:
        self._last: LaidOut | None = None

    def get(self, specs: list[EntrySpec]) -> LaidOut:
        last = self._last
        if last is not None and last.specs == specs:  # the same objects, mostly: compared by identity first
            return last
        entries, total = layout(specs)
        self._last = LaidOut(list(specs), entries, total, entries_template([e.json_pieces() for e in entries]))
        return self._last
