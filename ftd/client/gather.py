"""Restore of sharded snapshots: the replicas agree on a layout, then all-gather their pieces.

Each replica's pieces, in layout order, form one byte *stream* (raw bytes of every dtype alike,
so gloo's dtype support does not matter and the result is bit-exact by construction). The
streams move in rounds: round k all-gathers bytes [k*w, (k+1)*w) of every replica's stream
(zero-padded where a stream is shorter) with one `all_gather_into_tensor` over the replica
group, w = max(GATHER_BYTES // dp, MIN_ROUND_PIECE), so the memory of a round is bounded
whatever the tensor sizes are. Each round's bytes are copied straight into the live tensors
they belong to (parameters, existing optimizer state) or, where there is none, into fresh host
tensors. Every replica knows every stream's layout from the manifest: no sizes are exchanged.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ftd.client.segments import torch_dtype
from ftd.client.sharding import SPLIT, Layout, Replicas
from ftd.manifest import itemsize

log = logging.getLogger(__name__)

# Bytes one round gathers in all, by device of the collective. On gloo over loopback 8 MiB rounds
# restored 400 MB twice as fast as 32 MiB ones; NCCL wants larger messages.
GATHER_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}
MIN_ROUND_PIECE = 256 << 10  # ... but each replica sends at least this much per round (large dp)
UNSHARDED = 0  # the digest a replica reports for an unsharded snapshot
UNUSABLE = -1  # ... and for no usable snapshot at all


@dataclass(frozen=True)
class Piece:
    """Bytes [start, start + nbytes) of tensor `tensor` (index in the layout) at `at` in a replica's stream."""

    tensor: int
    start: int
    at: int
    nbytes: int


def streams(layout: Layout) -> list[list[Piece]]:
    """Every replica's stream: its pieces of the layout's stream, then the tensors it holds whole."""
    whole: dict[int, list[int]] = {}
    for t, tensor in enumerate(layout.tensors):
        if tensor.owner != SPLIT:
            whole.setdefault(tensor.owner, []).append(t)
    out = []
    for i in range(layout.dp):
        pieces, at = [], 0
        in_stream = [t for t in layout.stream_tensors(i) if layout.tensors[t].owner == SPLIT]
        for t in [*in_stream, *whole.get(i, [])]:
            tensor = layout.tensors[t]
            lo, hi = layout.span(t, i)
            size = itemsize(tensor.dtype)
            if hi > lo:
                pieces.append(Piece(t, lo * size, at, (hi - lo) * size))
                at += (hi - lo) * size
        out.append(pieces)
    return out


def _overlapping(pieces: list[Piece], lo: int, hi: int) -> list[tuple[Piece, int, int]]:
    """(piece, first, last) for each piece overlapping stream bytes [lo, hi), the overlap in stream bytes."""
    out = []
    k = max(0, bisect.bisect_right(pieces, lo, key=lambda p: p.at) - 1)
    while k < len(pieces) and pieces[k].at < hi:
        p = pieces[k]
        if p.at + p.nbytes > lo:
            out.append((p, max(lo, p.at), min(hi, p.at + p.nbytes)))
        k += 1
    return out


def pack(layout: Layout, mine: list[Piece], raw: Callable[[str], torch.Tensor], lo: int, hi: int,
         device: torch.device) -> torch.Tensor:
    """Bytes [lo, hi) of this replica's stream (`mine`), zero-padded past its end."""
    out = torch.empty(hi - lo, dtype=torch.uint8, device=device)
    end = 0
    for piece, first, last in _overlapping(mine, lo, hi):
        src = raw(layout.tensors[piece.tensor].name)
        out[first - lo:last - lo].copy_(src[first - piece.at:last - piece.at])
        end = last - lo
    out[end:].zero_()
    return out


def destinations(layout: Layout, into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Where each full tensor is assembled: `into[name]` when that is a contiguous tensor of its dtype and
    shape, else a fresh host tensor."""
    out = {}
    for tensor in layout.tensors:
        dtype = torch_dtype(tensor.dtype)
        target = (into or {}).get(tensor.name)
        if target is None or target.dtype != dtype or tuple(target.shape) != tensor.shape or not target.is_contiguous():
            target = torch.empty(tensor.shape, dtype=dtype)
        out[tensor.name] = target
    return out


def unpack(layout: Layout, all_streams: list[list[Piece]], rows: torch.Tensor, lo: int,
           dests: Mapping[str, torch.Tensor]) -> None:
    """Copy round bytes `rows` (dp x w: stream bytes [lo, lo + w) of every replica) into `dests`."""
    hi = lo + rows.shape[1]
    with torch.no_grad():
        for i, pieces in enumerate(all_streams):
            for piece, first, last in _overlapping(pieces, lo, hi):
                flat = dests[layout.tensors[piece.tensor].name].detach().reshape(-1).view(torch.uint8)
                begin = piece.start + first - piece.at
                flat[begin:begin + last - first].copy_(rows[i, first - lo:last - lo])


AllGather = Callable[[torch.Tensor, torch.Tensor], None]


def gather(layout: Layout, raw: Callable[[str], torch.Tensor], replicas: Replicas,
           into: Mapping[str, torch.Tensor] | None = None, all_gather: AllGather | None = None
           ) -> dict[str, torch.Tensor]:
    """Every full tensor of `layout`, assembled from all replicas (a collective over the replica group).

    `raw(name)` returns this replica's stored bytes of a tensor (uint8, 1-D); `into` names live
    tensors to assemble into (see `destinations`). `all_gather(rows, send)` is the collective
    (default: torch.distributed's over `replicas.group`).
    """
    exchange = all_gather or (lambda rows, send: dist.all_gather_into_tensor(rows, send, group=replicas.group))
    t0 = time.perf_counter()
    device = _device()
    all_streams = streams(layout)
    total = max((p.at + p.nbytes for pieces in all_streams for p in pieces[-1:]), default=0)
    width = max(MIN_ROUND_PIECE, GATHER_BYTES[device.type] // layout.dp)
    dests = destinations(layout, into)
    rounds = 0
    for lo in range(0, total, width):
        hi = min(lo + width, total)
        send = pack(layout, all_streams[layout.index], raw, lo, hi, device)
        rows = torch.empty(layout.dp * (hi - lo), dtype=torch.uint8, device=device)
        exchange(rows, send)
        unpack(layout, all_streams, rows.view(layout.dp, hi - lo), lo, dests)
        rounds += 1
    log.info("gathered %d sharded tensors from %d replicas (%d rounds of at most %d bytes each) in %.3f s",
             len(dests), layout.dp, rounds, width * layout.dp,
             time.perf_counter() - t0)
    return dests


def layouts_agree(layout: Layout | None, usable: bool, replicas: Replicas) -> bool:
    """True on every replica of the group when all of them opened a snapshot with the same layout.

    A collective over the replica group: every replica calls it once per candidate step.
    """
    mine = UNUSABLE if not usable else UNSHARDED if layout is None else layout.digest()
    if replicas.size == 1 or not dist.is_initialized():
        return usable
    device = _device()
    flag = torch.tensor([mine], dtype=torch.int64, device=device)
    everyone = torch.empty(replicas.size, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(everyone, flag, group=replicas.group)
    return usable and len(set(everyone.tolist())) == 1


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
