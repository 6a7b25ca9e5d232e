"""Restore onto another world size from the daemons' memory (docs/ARCHITECTURE.md §13).

When torchrun re-forms the job with fewer or more nodes, no snapshot in memory has this world
size. Every rank then:

1. asks its daemon for the old world's steps the job holds whole (`Worlds`: every old rank's
   segment on some live node; a lost member's data decoded by one survivor of its group), with
   each old rank's holder and manifest, and the ranks agree on the newest such step
   (all-gather);
2. builds the old world's global tensors from the manifests' placements and loads its model and
   optimizer through DCP's planner (`MemoryReader`, a `dcpload.PieceReader`): for each piece it
   needs, it reads only the elements DCP asks for, rounded out to the manifest's checksum chunks
   (4 MiB) so every byte is verified — from a segment on its own node (mapped, preferred when
   several old ranks hold the same piece, as DDP replicas do) or from a peer's (`ReadRanges`,
   over the bulk plane);
3. applies the per-rank state of old rank r (or 0) by dcpload's rule, or the script's
   `reshard_extra`.

The ranks agree on every outcome (all-reduce), so all load the step or none does; nothing is
written before every rank has checked its manifests against its model. The restore reports
old and new world, bytes by source and time to the daemon (`Recovered`; `ftd status`).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from ftd.client import dcpload, jsonsafe, state
from ftd.client.dcpload import Box, PieceReader, ReshardExtra
from ftd.client.restore import agree_on_steps, all_ranks_agree
from ftd.client.rpc import DaemonClient
from ftd.client.segments import MappedSegment, torch_dtype
from ftd.errors import FtdError, SnapshotCorrupt
from ftd.manifest import Entry, Manifest, chunk_checksums

log = logging.getLogger(__name__)

READ_BATCH_BYTES = 32 << 20
"""Bytes asked of a peer per ReadRanges call."""
GAP_BYTES = 64 << 10
"""Spans of one old segment closer than this are read in one range (one round trip on the bulk plane)."""
WORLD_BITS = 20
"""A (step, world size) pair travels in the step agreement as step << WORLD_BITS | world size."""


@dataclass
class OldRank:
    """One rank of the old world: where its segment is and what its manifest says."""

    rank: int
    node: int  # -1: this node
    source: str
    manifest: Manifest
    segment: MappedSegment | None = None


@dataclass
class Moved:
    """Bytes a reshard read, by where they were."""

    local: int = 0
    peers: int = 0
    decoded: int = 0

    @property
    def total(self) -> int:
        return self.local + self.peers


@dataclass(frozen=True)
class MemoryReshard:
    """A completed reshard from memory."""

    step: int
    old_world: int
    seconds: float
    moved: Moved
    extra: dict[str, Any] | None


class MemoryReader(PieceReader):
    """The old world's pieces, read from the daemons' memory by byte range and verified per checksum chunk."""

    def __init__(self, client: DaemonClient, job: str, step: int, ranks: dict[int, OldRank], me: int,
                 timeout: float | None):
        self.client, self.job, self.step, self.ranks, self.me, self.timeout = client, job, step, ranks, me, timeout
        self.moved = Moved()
        self._prefetched: dict[tuple[str, Box], tuple[int, bytearray]] = {}
        globals_: dcpload.Globals = {}
        self.holders: dict[tuple[str, Box], list[tuple[int, Entry]]] = {}
        for r, old in sorted(ranks.items()):
            for e in old.manifest.entries:
                p = e.placement
                if p is None:
                    continue
                dtype, shape, pieces = globals_.setdefault(p.fqn, (e.dtype, p.shape, []))
                if (dtype, shape) != (e.dtype, p.shape):
                    raise SnapshotCorrupt(f"{p.fqn}: old rank {r} holds {e.dtype}{list(p.shape)}, another rank "
                                          f"{dtype}{list(shape)}", step=step)
                holders = self.holders.setdefault((p.fqn, p.offsets), [])
                known = next((b for o, b in pieces if o == p.offsets), None)
                if known is None:
                    pieces.append((p.offsets, p.box))
                elif known != p.box:
                    raise SnapshotCorrupt(f"{p.fqn}: old ranks hold different boxes at {list(p.offsets)}", step=step)
                holders.append((r, e))
        for fqn, (_, shape, pieces) in globals_.items():
            if not dcpload.tiles(pieces, shape):
                raise SnapshotCorrupt(f"{fqn}: the old ranks' pieces do not tile its {list(shape)} elements exactly",
                                      step=step)
        super().__init__(globals_)

    def _holder(self, fqn: str, offsets: Box) -> tuple[OldRank, Entry]:
        """The old rank to read a piece from: one on this node when there is one, else a peer's, spread by piece."""
        holders = self.holders[(fqn, offsets)]
        local = [(r, e) for r, e in holders if self.ranks[r].node < 0]
        pool = local or holders
        r, e = pool[(zlib.crc32(f"{fqn}{offsets}".encode()) + self.me) % len(pool)]
        return self.ranks[r], e

    def prefetch(self, wanted: list[tuple[str, Box, int, int]]) -> None:
        """Read the peers' spans of `wanted` in batched ReadRanges calls (one per peer rank and 32 MiB),
        each verified; local spans are read when asked for."""
        remote: dict[tuple[int, int], list[tuple[tuple[str, Box], Entry, int, int]]] = {}
        for fqn, offsets, first, end in wanted:
            old, entry = self._holder(fqn, offsets)
            if old.node < 0:
                continue
            size = torch_dtype(entry.dtype).itemsize
            begin, stop = self.chunk_span(old.manifest, entry, first * size, end * size)
            remote.setdefault((old.node, old.rank), []).append(((fqn, offsets), entry, begin, stop))
        for (node, rank), spans in remote.items():
            for group in _coalesce(sorted(spans, key=lambda sp: sp[1].offset + sp[2])):
                self._fetch_group(self.ranks[rank], node, group)

    def _fetch_group(self, old: OldRank, node: int, group: list[tuple[tuple[str, Box], Entry, int, int]]) -> None:
        """One ReadRanges call for spans that lie close together in one old segment: the bytes from the first
        span's start to the last one's end (the gaps, at most GAP_BYTES each, travel too)."""
        lo = group[0][1].offset + group[0][2]
        hi = max(e.offset + t for _, e, _, t in group)
        data = self.client.read_ranges(old.rank, self.step, node, [(lo, hi - lo)], self.timeout)
        if len(data) != hi - lo:
            raise SnapshotCorrupt(f"node {node} sent {len(data)} bytes of old rank {old.rank} for {hi - lo}",
                                  rank=old.rank, step=self.step)
        self._account(old, hi - lo)
        for key, entry, begin, stop in group:
            at = entry.offset + begin - lo
            piece = bytearray(data[at:at + stop - begin])
            self._verify(old, entry, begin, stop, piece)
            self._prefetched[key] = (begin, piece)

    def read_elements(self, fqn: str, offsets: Box, first: int, end: int) -> tuple[torch.Tensor, int]:
        old, entry = self._holder(fqn, offsets)
        size = torch_dtype(entry.dtype).itemsize
        begin, stop = self.chunk_span(old.manifest, entry, first * size, end * size)
        got = self._prefetched.pop((fqn, offsets), None)
        if got is not None and got[0] == begin and len(got[1]) == stop - begin:
            data = got[1]
        else:
            data = self.read_verified(old, entry, begin, stop)
        flat = (torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))
        return flat.view(torch_dtype(entry.dtype)), begin // size

    @staticmethod
    def chunk_span(manifest: Manifest, entry: Entry, begin: int, stop: int) -> tuple[int, int]:
        """Bytes [begin, stop) of an entry, rounded out to its checksum chunks."""
        c = manifest.chunk_bytes
        return begin // c * c, min(-(-stop // c) * c, entry.nbytes)

    def read_verified(self, old: OldRank, entry: Entry, begin: int, stop: int) -> bytearray:
        """Entry bytes [begin, stop) (chunk-aligned) of an old rank, checked against its manifest's checksums."""
        data = self._read(old, entry.offset + begin, stop - begin)
        self._verify(old, entry, begin, stop, data)
        return data

    def _verify(self, old: OldRank, entry: Entry, begin: int, stop: int, data: bytearray) -> None:
        c = old.manifest.chunk_bytes
        if chunk_checksums(memoryview(data), c) != entry.checksums[begin // c:begin // c + -(-(stop - begin) // c)]:
            where = "this node" if old.node < 0 else f"node {old.node}"
            raise SnapshotCorrupt(f"checksum mismatch in old rank {old.rank}'s {entry.name} (bytes [{begin}, {stop}), "
                                  f"read from {where})", rank=old.rank, step=self.step, entry=entry.name)

    def _account(self, old: OldRank, length: int) -> None:
        if old.node < 0:
            self.moved.local += length
        else:
            self.moved.peers += length
        if old.source == "adopted":
            self.moved.decoded += length

    def _read(self, old: OldRank, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if old.node < 0:
            if old.segment is None:
                reply = self.client.open(self.step, rank=old.rank, timeout=self.timeout,
                                         world_size=old.manifest.world_size)
                if reply.source not in ("local", "peers") or old.manifest.data_bytes > reply.capacity:
                    raise SnapshotCorrupt(f"old rank {old.rank}'s segment here is not what Worlds said",
                                          rank=old.rank, step=self.step)
                old.segment = MappedSegment(reply.path, old.manifest.data_bytes, writable=False,
                                            trust=self.client.segment_trust())
            buf[:] = old.segment.memoryview()[offset:offset + length]
        else:
            pos = 0
            while pos < length:
                n = min(READ_BATCH_BYTES, length - pos)
                data = self.client.read_ranges(old.rank, self.step, old.node, [(offset + pos, n)], self.timeout)
                if len(data) != n:
                    raise SnapshotCorrupt(f"node {old.node} sent {len(data)} bytes of old rank {old.rank} for {n}",
                                          rank=old.rank, step=self.step)
                buf[pos:pos + n] = data
                pos += n
        self._account(old, length)
        return buf

    def raw_entry(self, old: OldRank, name: str) -> torch.Tensor:
        """A whole entry without placement (RNG, scheduler, extra tensors) of an old rank, verified."""
        entry = old.manifest.entry_map().get(name)
        if entry is None:
            raise SnapshotCorrupt("referenced but not in the manifest", rank=old.rank, step=self.step, entry=name)
        data = self.read_verified(old, entry, 0, entry.nbytes)
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(torch_dtype(entry.dtype)).reshape(entry.shape)

    def close(self) -> None:
        for old in self.ranks.values():
            if old.segment is not None:
                old.segment.close()
                old.segment = None


def _coalesce(spans: list[tuple[tuple[str, Box], Entry, int, int]]) -> list[list[tuple[tuple[str, Box], Entry, int, int]]]:
    """Spans sorted by position in their segment, in groups of at most READ_BATCH_BYTES whose gaps are
    under GAP_BYTES."""
    groups: list[list[tuple[tuple[str, Box], Entry, int, int]]] = []
    lo = end = 0
    for span in spans:
        start, stop = span[1].offset + span[2], span[1].offset + span[3]
        if groups and start - end <= GAP_BYTES and stop - lo <= READ_BATCH_BYTES:
            groups[-1].append(span)
            end = max(end, stop)
        else:
            groups.append([span])
            lo, end = start, stop
    return groups


def probe(client: DaemonClient, world_size: int, timeout: float | None) -> int:
    """The newest step of another world size the job holds whole without decoding anything (-1: none),
    the newest any rank sees (all-reduce MAX): a same-world step older than it is not restored."""
    import torch.distributed as dist

    newest = -1
    try:
        reply = client.worlds(world_size, decode=False, timeout=timeout)
        newest = max((s.step for s in reply.steps), default=-1)
    except FtdError as exc:
        log.debug("the daemon cannot list other worlds: %s", exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ftd.client.restore import _collective_device

        value = torch.tensor([newest], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        newest = int(value.item())
    return newest


def restore(client: DaemonClient, job: str, rank: int, world_size: int, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: state.Extra,
            restore_rng: bool = True, reshard_extra: ReshardExtra | None = None, timeout: float | None = None,
            run: str = "") -> MemoryReshard | None:
    """Reshard the newest old-world step the job holds whole onto this world; None when none loads on every rank."""
    t0 = time.perf_counter()
    offered: dict[tuple[int, int], Any] = {}
    try:
        for ws in client.worlds(world_size, decode=True, timeout=timeout).steps:
            offered[(int(ws.step), int(ws.world_size))] = ws
    except FtdError as exc:
        log.warning("rank %d: the daemon cannot list the old world's snapshots (%s); nothing to reshard", rank, exc)
    keys = agree_on_steps([(s << WORLD_BITS) | w for s, w in offered if 0 < w < (1 << WORLD_BITS)])
    for key in keys:
        step, old_world = key >> WORLD_BITS, key & ((1 << WORLD_BITS) - 1)
        reader, failure = None, ""
        try:
            reader = _reader(client, job, step, old_world, offered[(step, old_world)], rank, timeout, run)
            dicts = dcpload.StateDicts(model, optimizer)
            dcpload.check_target(reader.globals, dicts)
        except (FtdError, ValueError, KeyError, TypeError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
            log.error("rank %d: step %d of world %d cannot be resharded: %s", rank, step, old_world, failure)
        if not all_ranks_agree(reader is not None and not failure):
            if reader is not None:
                reader.close()
            continue
        assert reader is not None
        decoded, ok = None, False
        try:
            source = reader.ranks[rank if rank < old_world else 0]
            dcpload.load_tensors(reader, dicts)
            hook = (lambda: reshard_extra(_old_extras(reader))) if reshard_extra is not None else None
            decoded = dcpload.apply_small_state(source.manifest, lambda name: reader.raw_entry(source, name),
                                                optimizer, scheduler, extra, restore_rng, hook)
            ok = True
        except Exception as exc:  # noqa: BLE001 - the training loop is never raised into
            log.error("rank %d: resharding step %d from world %d failed: %s: %s", rank, step, old_world,
                      type(exc).__name__, exc)
        finally:
            reader.close()
        if not all_ranks_agree(ok):
            log.error("rank %d: falling back from step %d of world %d; the model and optimizer may hold part of it",
                      rank, step, old_world)
            continue
        seconds = time.perf_counter() - t0
        moved = reader.moved
        log.info("rank %d: resharded step %d from world %d onto world %d in %.2f s: %d bytes from this node's "
                 "memory, %d from peers (%d decoded from a lost node's parity); per-rank state of old rank %d",
                 rank, step, old_world, world_size, seconds, moved.local, moved.peers, moved.decoded,
                 rank if rank < old_world else 0)
        try:
            client.discard(step)
            client.recovered(step, seconds, moved.total, "resharded", old_world_size=old_world,
                             world_size=world_size, bytes_local=moved.local, bytes_peers=moved.peers,
                             bytes_decoded=moved.decoded)
        except FtdError as exc:
            log.debug("could not report the reshard: %s", exc)
        return MemoryReshard(step, old_world, seconds, moved, decoded)
    return None


def _reader(client: DaemonClient, job: str, step: int, old_world: int, ws: Any, rank: int, timeout: float | None,
            run: str) -> MemoryReader:
    """The reader over the old ranks of `ws` (a WorldStep), every manifest checked."""
    ranks: dict[int, OldRank] = {}
    for old in ws.ranks:
        m = Manifest.from_json(old.manifest_json)
        m.validate(m.data_bytes)
        if (m.job, m.step, m.world_size, m.rank) != (job, step, old_world, old.rank):
            raise SnapshotCorrupt(f"the manifest offered for old rank {old.rank} is job {m.job!r} rank {m.rank} of "
                                  f"{m.world_size} step {m.step}", rank=old.rank, step=step)
        if run and m.run != run:
            raise SnapshotCorrupt(f"old rank {old.rank}'s step {step} was taken by run {m.run!r}, this is {run!r}",
                                  rank=old.rank, step=step)
        if any(e.placement is None for e in m.entries if e.name.startswith(("model/", "optim/"))):
            raise SnapshotCorrupt(f"old rank {old.rank}'s snapshot has no global placements (taken by an older ftd)",
                                  rank=old.rank, step=step)
        ranks[old.rank] = OldRank(old.rank, old.node, old.source, m)
    if set(ranks) != set(range(old_world)):
        raise SnapshotCorrupt(f"old ranks {sorted(set(range(old_world)) - set(ranks))} are not offered", step=step)
    return MemoryReader(client, job, step, ranks, rank, timeout)


def _old_extras(reader: MemoryReader) -> list[dict[str, Any]]:
    """Every old rank's decoded `extra` (for the script's reshard_extra)."""
    out = []
    for r in sorted(reader.ranks):
        old = reader.ranks[r]
        out.append(jsonsafe.decode(old.manifest.meta.get("extra", {}), lambda n, o=old: reader.raw_entry(o, n)))
    return out
