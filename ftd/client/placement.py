"""Each entry's place in the checkpoint-wide state, for the durable tier (docs/ARCHITECTURE.md §12).

A rank's snapshot names its tensors after its own state dicts ("model/<name>",
"optim/state/..."). The durable tier writes them as one checkpoint that
`torch.distributed.checkpoint.load` reads onto any world size, so every model and optimizer
entry also carries a `Placement`: its flattened DCP name, its global shape, the box this rank
holds, and whether this rank is the one that writes that box:

- a plain tensor is the whole tensor (offsets 0). Ranks holding the same name hold the same
  tensor (DCP's convention; DDP replicas). With a replica group (`shard_replicated`,
  `replica_group=`, or a DDP-wrapped model: the whole world) the writers are spread over the
  replicas, largest tensor first to the replica with the fewest bytes so far, so each replica
  writes about 1/dp; without one, every rank writes its own copy and DCP reads any of them;
- a DTensor (FSDP2, tensor parallel) is its shard at the offsets DCP computes; among ranks
  that hold the same shard (replicated mesh dimensions) the one at coordinate 0 writes it;
- a piece of a sharded replicated tensor (ftd.client.sharding) is a box of whole rows, written
  by the replica that holds it.

RNG streams, scheduler and `extra` tensors have no placement: they are per-rank ftd state and
travel beside the checkpoint (ftd.durable.layout).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

from ftd.client.sharding import SPLIT, Layout, Replicas, piece_box
from ftd.client.state import Captured
from ftd.manifest import EntrySpec, Placement


def assign(cap: Captured, dedup: Replicas | None, replicated: Callable[[str], bool]) -> None:
    """Give every entry of `cap` that has a checkpoint-wide name its placement (in place).

    `dedup`: the replica group whose ranks hold identical copies of the `replicated` entries
    (None or size 1: every rank writes what it holds).
    """
    layout = Layout.from_meta(cap.meta["sharding"]) if "sharding" in cap.meta else None
    pieces = _pieces(layout) if layout is not None else {}
    copies = [i for i, spec in enumerate(cap.specs)
              if spec.name in cap.fqns and spec.name not in pieces and spec.name not in cap.dtensor_places
              and replicated(spec.name)]
    writers = _spread([cap.specs[i] for i in copies], dedup.size) if dedup is not None and dedup.size > 1 else {}
    for i, spec in enumerate(cap.specs):
        fqn = cap.fqns.get(spec.name)
        if fqn is None:
            continue
        placement: Placement | None
        if spec.name in pieces:
            placement = pieces[spec.name](fqn)
        elif spec.name in cap.dtensor_places:
            d = cap.dtensor_places[spec.name]
            placement = Placement(fqn, d.shape, d.offsets, d.box, d.write) if math.prod(d.box) == math.prod(
                spec.shape) else None
        else:
            owner = writers.get(spec.name)
            write = owner is None or dedup is None or owner == dedup.index
            if cap.cache is not None:  # the same spec placed alike at the previous step: the same placed spec
                held = cap.cache.placed.get((spec.name, fqn, write))
                if held is not None and held[0] is spec:
                    cap.specs[i] = held[1]
                    continue
            placement = Placement(fqn, tuple(spec.shape), (0,) * len(spec.shape), tuple(spec.shape), write)
            if cap.cache is not None:
                placed = EntrySpec(spec.name, spec.kind, spec.dtype, spec.shape, placement)
                cap.cache.placed[(spec.name, fqn, write)] = (spec, placed)
                cap.specs[i] = placed
                continue
        if placement is not None:
            cap.specs[i] = EntrySpec(spec.name, spec.kind, spec.dtype, spec.shape, placement)


def _pieces(layout: Layout) -> dict[str, Callable[[str], Placement | None]]:
    """Entry name -> its placement (given its fqn) for the tensors of a sharded layout this replica holds."""
    out: dict[str, Callable[[str], Placement | None]] = {}
    for t, tensor in enumerate(layout.tensors):
        if tensor.owner == layout.index:
            out[tensor.name] = lambda fqn, s=tensor.shape: Placement(fqn, s, (0,) * len(s), s, True)
        elif tensor.owner == SPLIT:
            lo, hi = layout.span(t, layout.index)
            if hi > lo:
                box = piece_box(tensor.shape, lo, hi)
                out[tensor.name] = (lambda fqn, s=tensor.shape, b=box:
                                    Placement(fqn, s, b[0], b[1], True) if b is not None else None)
    return out


def _spread(specs: list[EntrySpec], dp: int) -> dict[str, int]:
    """Entry name -> the replica that writes it: largest first, each to the replica with the fewest bytes."""
    load = [(0, i) for i in range(dp)]
    out: dict[str, int] = {}
    for spec in sorted(specs, key=lambda s: (-s.nbytes, s.name)):
        least, owner = heapq.heappop(load)
        out[spec.name] = owner
        heapq.heappush(load, (least + spec.nbytes, owner))
    return out
