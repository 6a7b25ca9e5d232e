"""Sharded snapshots of replicated state (docs/ARCHITECTURE.md §3.4): which replica stores which part of which tensor.

Under plain data parallelism every replica of a *replica group* holds bit-identical parameters
and optimizer state, so each of the `dp` replicas stores only its part of them:

- the contiguous tensors, flattened (row-major) and laid end to end in capture order, form one
  virtual byte *stream* of S bytes. It is cut into `dp` contiguous ranges at `cuts` (about
  S*i/dp, moved down to the nearest element boundary): replica `i` stores bytes
  `[cuts[i], cuts[i+1])`, i.e. a 1-D slice of each tensor that range overlaps. Cuts fall on
  row boundaries (a row: one index of the first dimension), so each piece is also a box of whole
  rows of the tensor, which is how the durable tier's checkpoint names it (`piece_box`). The copy thread
  reads flat slice views of the live tensors, as it reads any other entry. A replica stores at
  most one piece of a tensor, about T/dp + 1 pieces in all, so the cost stays flat as dp grows.
- a non-contiguous tensor (no slice view without a copy) goes whole, in its own shape, to one
  replica: largest first, each to the replica that holds the fewest bytes so far.

A replica that stores nothing of a tensor has no entry for it. The layout travels in the
manifest meta as `meta["sharding"] = {"dp", "index", "cuts", "tensors": {name: [dtype, full
shape, owner]}}` (owner -1: in the stream). Restore checks each rank's entries against it and
the job's replica group (`check`); `ftd.client.gather` reassembles the full tensors.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import xxhash

from ftd.errors import FtdError, SnapshotCorrupt
from ftd.manifest import EntrySpec, Manifest, itemsize



class CapturedState(Protocol):
    """What `shard` needs of a capture (ftd.client.state.Captured): its specs, sources and meta."""

    specs: list[EntrySpec]
    sources: list[torch.Tensor]
    meta: dict[str, Any]

SPLIT = -1  # the owner of a tensor that lies in the stream


@dataclass(frozen=True)
class Replicas:
    """A replica group of `size` ranks holding identical state; this rank is replica `index`.

    `group` is the torch.distributed ProcessGroup of the replicas (None: the default group).
    """

    size: int
    index: int
    group: Any = None


@dataclass(frozen=True)
class Sharded:
    """One tensor of the layout: its dtype, its full shape and who holds it (SPLIT: it lies in the stream)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    owner: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class Layout:
    """How a step's replicated tensors are spread over the dp replicas; this snapshot is replica `index`."""

    dp: int
    index: int
    tensors: tuple[Sharded, ...]
    cuts: tuple[int, ...]  # dp + 1 byte offsets into the stream

    @functools.cached_property
    def offsets(self) -> list[int]:
        """Stream offset of each tensor (that of the next stream tensor for a whole one)."""
        out, at = [], 0
        for t in self.tensors:
            out.append(at)
            at += t.nbytes if t.owner == SPLIT else 0
        return out

    @property
    def stream_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.owner == SPLIT)

    def span(self, t: int, index: int) -> tuple[int, int]:
        """The flattened elements [lo, hi) of tensor `t` that replica `index` stores (lo == hi: none)."""
        tensor = self.tensors[t]
        if tensor.owner != SPLIT:
            return (0, tensor.numel) if tensor.owner == index else (0, 0)
        start, size = self.offsets[t], itemsize(tensor.dtype)
        lo = max(self.cuts[index], start) - start
        hi = min(self.cuts[index + 1], start + tensor.nbytes) - start
        return (lo // size, hi // size) if hi > lo else (0, 0)

    def piece_shape(self, t: int, index: int) -> tuple[int, ...] | None:
        """The shape of replica `index`'s entry for tensor `t`, None when it stores none of it."""
        tensor = self.tensors[t]
        if tensor.owner == index:
            return tensor.shape
        lo, hi = self.span(t, index)
        return (hi - lo,) if tensor.owner == SPLIT and hi > lo else None

    def stream_tensors(self, index: int) -> range:
        """Indices of the tensors that replica `index`'s stream range may overlap (a superset, in order)."""
        lo, hi = self.cuts[index], self.cuts[index + 1]
        return range(max(0, bisect.bisect_right(self.offsets, lo) - 1), bisect.bisect_left(self.offsets, hi))

    def held_bytes(self, index: int) -> int:
        """Bytes replica `index` stores."""
        whole = sum(t.nbytes for t in self.tensors if t.owner == index)
        return whole + self.cuts[index + 1] - self.cuts[index]

    def to_meta(self) -> dict[str, Any]:
        return {"dp": self.dp, "index": self.index, "cuts": list(self.cuts),
                "tensors": {t.name: [t.dtype, list(t.shape), t.owner] for t in self.tensors}}

    @classmethod
    def from_meta(cls, doc: Any) -> Layout:
        """Parse and type-check `meta["sharding"]`; SnapshotCorrupt on anything malformed."""
        try:
            dp, index, cuts, tensors = doc["dp"], doc["index"], doc["cuts"], doc["tensors"]
            if not (_is_int(dp) and _is_int(index) and 0 <= index < dp and isinstance(tensors, dict)
                    and isinstance(cuts, list) and len(cuts) == dp + 1 and all(_is_int(c) for c in cuts)):
                raise ValueError(f"dp {dp!r}, index {index!r}, {len(cuts) if isinstance(cuts, list) else 'no'} cuts")
            parsed = []
            for name, (dtype, shape, owner) in tensors.items():
                itemsize(dtype)
                if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape) and _is_int(owner)
                        and -1 <= owner < dp):
                    raise ValueError(f"{name}: shape {shape!r}, owner {owner!r}")
                parsed.append(Sharded(name, dtype, tuple(shape), owner))
            layout = cls(dp, index, tuple(parsed), tuple(cuts))
            _check_cuts(layout)
        except (KeyError, TypeError, ValueError, FtdError) as exc:
            raise SnapshotCorrupt(f"malformed sharding layout in the manifest: {exc}") from exc
        return layout

    def digest(self) -> int:
        """A 63-bit fingerprint of the layout that every replica of the group must share (index excluded)."""
        doc = {k: v for k, v in self.to_meta().items() if k != "index"}
        return xxhash.xxh3_64_intdigest(json.dumps(doc, separators=(",", ":")).encode()) >> 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_cuts(layout: Layout) -> None:
    """Cuts start at 0, end at the stream's end, never go back, and fall on element boundaries."""
    cuts = layout.cuts
    if cuts[0] != 0 or cuts[-1] != layout.stream_bytes or any(a > b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts {cuts[:4]}... do not divide a stream of {layout.stream_bytes} bytes")
    stream = [t for t in range(len(layout.tensors)) if layout.tensors[t].owner == SPLIT]
    starts = [layout.offsets[t] for t in stream]
    for cut in cuts[1:-1]:
        k = bisect.bisect_right(starts, cut) - 1
        if k >= 0 and (cut - starts[k]) % itemsize(layout.tensors[stream[k]].dtype):
            raise ValueError(f"cut {cut} splits an element of {layout.tensors[stream[k]].name}")


def row_bytes(spec: EntrySpec) -> int:
    """Bytes of one row of the tensor (all dimensions but the first); a 0-d or 1-d tensor's row is one element."""
    return math.prod(spec.shape[1:]) * itemsize(spec.dtype)


def piece_box(shape: tuple[int, ...], lo: int, hi: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offsets, box) of the flattened elements [lo, hi) of a tensor of `shape`; None unless whole rows."""
    if not shape:
        return ((), ()) if (lo, hi) == (0, 1) else None
    row = math.prod(shape[1:])
    if row == 0 or lo % row or hi % row:
        return None
    return (lo // row,) + (0,) * (len(shape) - 1), ((hi - lo) // row,) + tuple(shape[1:])


def plan(specs: Sequence[EntrySpec], contiguous: Sequence[bool], dp: int, index: int) -> Layout:
    """Spread `specs` (identical, in the same order, on every replica) over `dp` replicas."""
    owners = [SPLIT if ok else 0 for ok in contiguous]
    starts, at = [], 0
    for spec, owner in zip(specs, owners):
        starts.append(at)
        at += spec.nbytes if owner == SPLIT else 0
    stream = [k for k, owner in enumerate(owners) if owner == SPLIT]
    stream_starts = [starts[k] for k in stream]
    cuts = [0]
    for i in range(1, dp):
        cut = at * i // dp
        k = bisect.bisect_right(stream_starts, cut) - 1
        size = row_bytes(specs[stream[k]]) if k >= 0 else 1
        cuts.append(max(cuts[-1], cut - (cut - stream_starts[k]) % size if k >= 0 else cut))
    cuts.append(at)
    load = [(cuts[i + 1] - cuts[i], i) for i in range(dp)]  # a heap: O(log dp) per whole tensor
    for k in sorted((k for k, owner in enumerate(owners) if owner != SPLIT), key=lambda k: (-specs[k].nbytes, k)):
        least, owners[k] = heapq.heappop(load)
        heapq.heappush(load, (least + specs[k].nbytes, owners[k]))
    tensors = tuple(Sharded(spec.name, spec.dtype, tuple(spec.shape), owner) for spec, owner in zip(specs, owners))
    return Layout(dp, index, tensors, tuple(cuts))


def shard(cap: CapturedState, replicas: Replicas, eligible: Callable[[str], bool]) -> Layout:
    """Replace the eligible entries of `cap` by this replica's pieces and record the layout in its meta."""
    chosen = [i for i, spec in enumerate(cap.specs) if eligible(spec.name)]
    layout = plan([cap.specs[i] for i in chosen], [cap.sources[i].is_contiguous() for i in chosen],
                  replicas.size, replicas.index)
    pieces: dict[int, tuple[EntrySpec, torch.Tensor] | None] = dict.fromkeys(chosen)
    for t in layout.stream_tensors(layout.index):
        i = chosen[t]
        shape = layout.piece_shape(t, layout.index)
        if shape is not None:
            lo, hi = layout.span(t, layout.index)
            spec = cap.specs[i]
            pieces[i] = (EntrySpec(spec.name, spec.kind, spec.dtype, shape), cap.sources[i].reshape(-1)[lo:hi])
    for t, tensor in enumerate(layout.tensors):
        if tensor.owner == layout.index:
            pieces[chosen[t]] = (cap.specs[chosen[t]], cap.sources[chosen[t]])
    specs, sources = [], []
    for i, (spec, src) in enumerate(zip(cap.specs, cap.sources)):
        piece = pieces[i] if i in pieces else (spec, src)
        if piece is not None:
            specs.append(piece[0])
            sources.append(piece[1])
    cap.specs[:], cap.sources[:] = specs, sources
    cap.meta["sharding"] = layout.to_meta()
    return layout


def check(manifest: Manifest, replicas: Replicas | None) -> Layout | None:
    """The manifest's layout after checking that it fits `replicas` and the entries; None when unsharded."""
    if "sharding" not in manifest.meta:
        return None
    layout = Layout.from_meta(manifest.meta["sharding"])

    def corrupt(message: str, entry: str | None = None) -> SnapshotCorrupt:
        return SnapshotCorrupt(message, rank=manifest.rank, step=manifest.step, entry=entry)

    if replicas is None:
        raise corrupt(f"snapshot is sharded over {layout.dp} replicas but this Snapshotter does not shard "
                      "(pass shard_replicated=True or replica_group=)")
    if layout.dp != replicas.size:
        raise corrupt(f"snapshot is sharded over dp={layout.dp} replicas; this job's replica group has "
                      f"{replicas.size}")
    if layout.index != replicas.index:
        raise corrupt(f"snapshot holds replica {layout.index}'s shard; this rank is replica {replicas.index}")
    entries = manifest.entry_map()
    for t, tensor in enumerate(layout.tensors):
        shape, entry = layout.piece_shape(t, layout.index), entries.get(tensor.name)
        if shape is None and entry is not None:
            raise corrupt("the layout assigns it to other replicas, yet it has an entry", tensor.name)
        if shape is not None and (entry is None or entry.dtype != tensor.dtype or tuple(entry.shape) != shape):
            found = "no entry" if entry is None else f"{entry.dtype}{list(entry.shape)}"
            raise corrupt(f"the layout expects {tensor.dtype}{list(shape)}, the snapshot has {found}", tensor.name)
    return layout


def full_specs(manifest: Manifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, full shape) of every tensor the snapshot holds in full or in part."""
    out = {e.name: (e.dtype, tuple(e.shape)) for e in manifest.entries}
    if "sharding" in manifest.meta:
        out.update({t.name: (t.dtype, t.shape) for t in Layout.from_meta(manifest.meta["sharding"]).tensors})
    return out
