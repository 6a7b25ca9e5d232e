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
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ftd.client import jsonsafe, state
from ftd.client.restore import all_ranks_agree
from ftd.client.segments import torch_dtype
from ftd.durable import layout, reader
from ftd.durable.reader import DurableCorrupt, DurableStep
from ftd.manifest import Entry, Manifest, chunk_checksums

log = logging.getLogger(__name__)

ReshardExtra = Callable[[list[dict[str, Any]]], dict[str, Any]]


class DurableReader(StorageReader):
    """A DCP StorageReader over a verified durable step: metadata from ftd's index, pieces checksum-verified."""

    def __init__(self, step: DurableStep):
        super().__init__()
        self.step = step
        self._manifests: dict[int, Manifest] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md: dict[str, Any] = {}
        for fqn, (dtype, shape, pieces) in self.step.index.globals.items():
            md[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype(dtype)), torch.Size(shape),
                                            [ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.box))
                                             for p in pieces])
        return Metadata(state_dict_metadata=md, storage_meta=StorageMeta())

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def piece(self, fqn: str, offsets: tuple[int, ...]) -> torch.Tensor:
        """The piece of global tensor `fqn` whose corner is `offsets`, read and checked against its writer's
        chunk checksums, shaped as its box; DurableCorrupt when it is missing or does not verify."""
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
        return tensor.reshape(entry.placement.box)  # type: ignore[union-attr]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for item in plan.items:
            key = (item.storage_index.fqn, tuple(item.storage_index.offset or ()))
            if key not in cache:
                cache[key] = self.piece(*key)
            source = cache[key]
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                source = source.narrow(dim, start, length)
            target = planner.resolve_tensor(item).detach()
            target.copy_(source)
            planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future


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
        _load_tensors(opened, model, optimizer)
        decoded = _apply_small_state(manifest, raw, optimizer, scheduler, extra, restore_rng, opened, old_world,
                                     reshard_extra)
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


def _load_tensors(opened: DurableStep, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    msd = get_model_state_dict(model)
    target: dict[str, Any] = {"model": msd}
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        target["optim"] = {"state": osd["state"]}
    dcp.load(target, storage_reader=DurableReader(opened), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, msd)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd)


def _apply_small_state(manifest: Manifest, raw: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                       scheduler: Any | None, extra: state.Extra, restore_rng: bool, opened: DurableStep,
                       old_world: int, reshard_extra: ReshardExtra | None) -> dict[str, Any] | None:
    meta = manifest.meta

    def source(name: str) -> torch.Tensor:
        return raw[name].clone()

    if optimizer is not None and "optim" in meta:
        groups = jsonsafe.decode(meta["optim"]["param_groups"], source)
        for group, saved in zip(optimizer.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(jsonsafe.decode(meta["scheduler"], source))
    if restore_rng and "rng" in meta:
        state.apply_rng(meta["rng"], source)
    decoded = jsonsafe.decode(meta["extra"], source) if "extra" in meta else None
    if reshard_extra is not None:
        extras = []
        for old in range(old_world):
            m = Manifest.from_json(opened.record(old).manifest_json)
            old_raw = _raw_entries(opened, old, m)
            extras.append(jsonsafe.decode(m.meta.get("extra", {}), lambda n, r=old_raw: r[n].clone()))
        decoded = reshard_extra(extras)
    if isinstance(decoded, dict) and isinstance(extra, dict):
        extra.clear()
        extra.update(decoded)
    return decoded
