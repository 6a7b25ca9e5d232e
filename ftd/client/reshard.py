"""Restore onto another world size from the durable tier, through DCP's load planning (docs/ARCHITECTURE.md §12.3).

When memory holds nothing this world can use and the durable tier's newest step was taken by a
different number of ranks (4 FSDP2 ranks -> 2, DDP 3 -> 2), every rank:

1. opens the newest committed step (commit marker and index verified) that all ranks see;
2. loads the model and optimizer tensors with `torch.distributed.checkpoint.load` through
   `DurableReader`, a StorageReader over ftd's index: DCP plans which boxes of which global
   tensors this rank needs (its DTensor shards, or whole tensors), and the reader reads exactly
   those pieces, each verified against the chunk checksums of the manifest that wrote it;
3. applies the per-rank state by a fixed rule: new rank r takes old rank r's scheduler, param
   groups, RNG streams and `extra` (data position), or old rank 0's when r did not exist. A
   script that needs another rule passes `reshard_extra=` to the Snapshotter (called with the
   old world's `extra` of every old rank, it returns this rank's).

Nothing is written until every rank has verified what it will read; a failure on any rank makes
every rank start fresh (all-reduce, as for an in-memory restore).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ftd.client import dcpload, jsonsafe, state
from ftd.client.dcpload import PieceReader, ReshardExtra
from ftd.client.restore import all_ranks_agree
from ftd.client.segments import torch_dtype
from ftd.durable import layout, reader
from ftd.durable.reader import DurableCorrupt, DurableStep
from ftd.manifest import Entry, Manifest, chunk_checksums

log = logging.getLogger(__name__)

__all__ = ["DurableReader", "ReshardExtra", "newest_other_world", "restore"]


class DurableReader(PieceReader):
    """A DCP StorageReader over a verified durable step: metadata from ftd's index, pieces checksum-verified."""

    def __init__(self, step: DurableStep):
        super().__init__({fqn: (dtype, shape, [(p.offsets, p.box) for p in pieces])
                          for fqn, (dtype, shape, pieces) in step.index.globals.items()})
        self.step = step
        self._manifests: dict[int, Manifest] = {}

    def read_elements(self, fqn: str, offsets: tuple[int, ...], first: int, end: int) -> tuple[torch.Tensor, int]:
        """The whole piece (a durable piece is verified as a whole)."""
        piece = self.step.index.find(fqn, offsets)
        if piece is None:
            raise DurableCorrupt(f"{fqn}: no piece at {list(offsets)}")
        writer = self._manifests.get(piece.rank)
        if writer is None:
            writer = self._manifests[piece.rank] = Manifest.from_json(self.step.record(piece.rank).manifest_json)
        entry = next((e for e in writer.entries if e.placement is not None and e.placement.fqn == fqn
                      and e.placement.offsets == offsets), None)
        if entry is None or entry.nbytes != piece.span[1] - piece.span[0]:
            raise DurableCorrupt(f"{fqn}: rank {piece.rank}'s manifest does not describe the piece at {list(offsets)}")
        path = self.step.path / layout.tensors_file(piece.rank)
        tensor = _read_verified(path, piece.span[0], entry, writer.chunk_bytes,
                                lambda f: self.step.check_header(piece.rank, f))
        self.bytes_read += entry.nbytes
        return tensor, 0


def newest_other_world(durable_dir: str, job: str, world_size: int) -> DurableStep | None:
    """The newest committed step, verified, when it was taken by another world size (same world: the daemon serves it)."""
    root = layout.job_dir(durable_dir, job)
    for step in reversed(reader.committed_steps(Path(root))):
        try:
            opened = DurableStep.open(Path(root), step)
        except DurableCorrupt as exc:
            log.warning("durable step %d is unusable: %s", step, exc)
            continue
        return opened if opened.index.world_size != world_size else None
    return None


def restore(durable_dir: str, job: str, rank: int, world_size: int, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: state.Extra,
            restore_rng: bool = True, reshard_extra: ReshardExtra | None = None
            ) -> tuple[int, float, dict[str, Any] | None]:
    """(step, seconds, decoded extra) of a resharded restore; step 0 when there is nothing to reshard from."""
    t0 = time.perf_counter()
    opened = newest_other_world(durable_dir, job, world_size)
    step = opened.index.step if opened is not None else 0
    if not all_ranks_agree(step > 0) or opened is None or not _same_step(step):
        return 0, time.perf_counter() - t0, None
    old_world = opened.index.world_size
    try:
        source_rank = rank if rank < old_world else 0
        manifest = Manifest.from_json(opened.record(source_rank).manifest_json)
        raw = _raw_entries(opened, source_rank, manifest)
        ok = True
    except Exception as exc:  # noqa: BLE001 - the training loop is never raised into
        log.error("rank %d: durable step %d cannot be resharded: %s", rank, step, exc)
        ok = False
    if not all_ranks_agree(ok):
        return 0, time.perf_counter() - t0, None
    decoded = None
    try:
        reader = DurableReader(opened)
        dicts = dcpload.StateDicts(model, optimizer)
        dcpload.check_target(reader.globals, dicts)
        dcpload.load_tensors(reader, dicts)
        hook = (lambda: reshard_extra(_old_extras(opened, old_world))) if reshard_extra is not None else None
        decoded = dcpload.apply_small_state(manifest, lambda name: raw[name].clone(), optimizer, scheduler, extra,
                                            restore_rng, hook)
        ok = True
    except Exception as exc:  # noqa: BLE001
        log.error("rank %d: resharding durable step %d failed: %s: %s", rank, step, type(exc).__name__, exc)
        ok = False
    if not all_ranks_agree(ok):
        log.error("rank %d: starting from step 0; the model and optimizer may hold part of durable step %d", rank,
                  step)
        return 0, time.perf_counter() - t0, None
    seconds = time.perf_counter() - t0
    log.info("rank %d: resharded durable step %d from %d ranks onto %d in %.2f s (per-rank state of old rank %d)",
             rank, step, old_world, world_size, seconds, rank if rank < old_world else 0)
    return step, seconds, decoded


def _same_step(step: int) -> bool:
    """Every rank picked the same step (they list the shared directory at slightly different times)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    value = torch.tensor([step, -step], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value[0]) == step and int(-value[1]) == step


def _raw_entries(opened: DurableStep, rank: int, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Rank `rank`'s entries that have no global name (RNG, scheduler and extra tensors), verified."""
    rec = opened.record(rank)
    out: dict[str, torch.Tensor] = {}
    entries = manifest.entry_map()
    for name, (begin, end) in rec.raw.items():
        entry = entries.get(name)
        if entry is None or entry.nbytes != end - begin:
            raise DurableCorrupt(f"rank {rank}'s raw entry {name} does not match its manifest")
        out[name] = _read_verified(opened.path / layout.raw_file(rank), begin, entry,
                                   manifest.chunk_bytes).reshape(entry.shape)
    return out


def _read_verified(path: Path, begin: int, entry: Entry, chunk_bytes: int,
                   check: Callable[[BinaryIO], None] | None = None) -> torch.Tensor:
    """`entry`'s bytes at `begin` in `path` as a flat tensor of its dtype, checked against its chunk checksums
    (and `check`, given the open file, first)."""
    with open(path, "rb") as f:
        if check is not None:
            check(f)
        f.seek(begin)
        data = bytearray(entry.nbytes)
        if f.readinto(data) != entry.nbytes:
            raise DurableCorrupt(f"{path}: truncated in {entry.name}")
    if chunk_checksums(memoryview(data), chunk_bytes) != entry.checksums:
        raise DurableCorrupt(f"{path}: checksum mismatch in {entry.name}")
    tensor = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return tensor.view(torch_dtype(entry.dtype))


def _old_extras(opened: DurableStep, old_world: int) -> list[dict[str, Any]]:
    """Every old rank's decoded `extra` (for the script's reshard_extra)."""
    extras = []
    for old in range(old_world):
        m = Manifest.from_json(opened.record(old).manifest_json)
        old_raw = _raw_entries(opened, old, m)
        extras.append(jsonsafe.decode(m.meta.get("extra", {}), lambda n, r=old_raw: r[n].clone()))
    return extras
