"""Restore: find the newest step every rank holds, verify it, load it; fall back when it is bad.

Verification (manifest bounds, job id, world size, checksums of every byte, shapes and dtypes
against the model, the sharding layout against the replica group) happens before anything is
written into the live objects, and the ranks agree on the outcome through torch.distributed
(all-gather of held steps, all-gather of layouts within the replica group, all-reduce of
"verified") so every rank loads the same step or none does. A sharded step is then gathered
from the replicas (ftd.client.gather) and loaded like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ftd.client import gather, sharding, state
from ftd.client.rpc import DaemonClient
from ftd.client.segments import MappedSegment
from ftd.client.sharding import Layout, Replicas
from ftd.errors import DaemonUnavailable, FtdError, SnapshotCorrupt
from ftd.manifest import Manifest

log = logging.getLogger(__name__)

MAX_STEPS_EXCHANGED = 64


@dataclass
class RestoreResult:
    step: int
    seconds: float
    nbytes: int
    extra: dict[str, Any] | None
    failures: list[str]
    source: str = "none"
    meta: dict[str, Any] | None = None


class OpenedSnapshot:
    """A sealed snapshot mapped read-only and verified."""

    def __init__(self, manifest: Manifest, segment: MappedSegment, source: str = "local",
                 layout: Layout | None = None):
        self.manifest, self.segment, self.source, self.layout = manifest, segment, source, layout
        self._entries = manifest.entry_map()

    def _entry(self, name: str) -> Any:
        entry = self._entries.get(name)
        if entry is None:
            raise SnapshotCorrupt("referenced but not in the manifest", rank=self.manifest.rank,
                                  step=self.manifest.step, entry=name)
        return entry

    def view(self, name: str) -> torch.Tensor:
        return self.segment.entry(self._entry(name))

    def raw(self, name: str) -> torch.Tensor:
        """An entry's bytes (uint8, 1-D)."""
        entry = self._entry(name)
        return self.segment.bytes[entry.offset:entry.offset + entry.nbytes]

    def close(self) -> None:
        self.segment.close()


def open_verified(client: DaemonClient, job: str, rank: int, world_size: int, step: int,
                  model: torch.nn.Module, timeout: float | None = None,
                  replicas: Replicas | None = None) -> OpenedSnapshot:
    """Open (job, rank, step) from the daemon and run every check; SnapshotCorrupt on the first failure.

    A sharded snapshot must fit `replicas` (same dp, same replica index).
    """
    reply = client.open(step, timeout=timeout)
    manifest = Manifest.from_json(reply.manifest_json)
    if manifest.job != job:
        raise SnapshotCorrupt(f"snapshot belongs to job {manifest.job!r}, not {job!r}", rank=rank, step=step)
    if (manifest.rank, manifest.step) != (rank, step):
        raise SnapshotCorrupt(f"manifest says rank {manifest.rank} step {manifest.step}", rank=rank, step=step)
    if manifest.world_size != world_size:
        raise SnapshotCorrupt(f"taken with world size {manifest.world_size}, this job runs {world_size} "
                              "(resharding is not supported)", rank=rank, step=step)
    manifest.validate(reply.capacity)
    layout = sharding.check(manifest, replicas)
    try:
        segment = MappedSegment(reply.path, manifest.data_bytes, writable=False)
    except (SnapshotCorrupt, OSError) as exc:
        raise SnapshotCorrupt(f"cannot map the segment: {exc}", rank=rank, step=step) from exc
    try:
        manifest.verify(segment.memoryview())
        state.check_model(manifest, model)
    except BaseException:
        segment.close()
        raise
    return OpenedSnapshot(manifest, segment, reply.source or "local", layout)


def restore(client: DaemonClient, job: str, rank: int, world_size: int, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: state.Extra,
            restore_rng: bool = True, list_timeout: float | None = None,
            replicas: Replicas | None = None, steps: list[int] | None = None,
            abstain: bool = False) -> RestoreResult:
    """Load the newest step that every rank holds and that verifies everywhere; step 0 when none.

    With `replicas` (sharding configured; the same on every rank) a sharded step is gathered
    from the replica group. `steps` (the same list on every rank) replaces the exchange of held
    steps; an `abstain`ing rank loads nothing and agrees to whatever the others can load (the
    pipeline planner's lost stages, rebuilt afterwards).
    """
    t0 = time.perf_counter()
    failures: list[str] = []
    if steps is not None:
        local = candidates = sorted(set(steps), reverse=True)
    else:
        try:
            local = client.list_steps(timeout=list_timeout)
        except DaemonUnavailable as exc:
            log.error("rank %d: cannot list snapshots (%s); this rank has nothing to restore", rank, exc)
            failures.append(str(exc))
            local = []
        candidates = agree_on_steps(local)
    for step in candidates:
        opened = None
        if abstain:
            if all_ranks_agree(True):
                return RestoreResult(0, time.perf_counter() - t0, 0, None, failures)
            continue
        try:
            opened = open_verified(client, job, rank, world_size, step, model, list_timeout, replicas)
            if opened.layout is not None:  # the gather writes into the optimizer: it must fit before it starts
                state.check_optimizer(opened.manifest, optimizer)
        except FtdError as exc:
            log.error("rank %d: step %d is unusable: %s", rank, step, exc)
            failures.append(str(exc))
        usable = opened is not None
        if replicas is not None and not gather.layouts_agree(opened.layout if opened else None, usable, replicas):
            if usable:
                log.error("rank %d: step %d is unusable: the replicas' snapshots are not sharded alike", rank, step)
            usable = False
        if not all_ranks_agree(usable):
            if opened is not None:
                opened.close()
            log.warning("rank %d: falling back from step %d (not usable on every rank)", rank, step)
            continue
        assert opened is not None
        try:
            view = _gathered_view(opened, replicas, model, optimizer)
            decoded = state.apply(opened.manifest, view, model, optimizer, scheduler, extra, restore_rng)
        finally:
            opened.close()
        _discard_above(client, step)
        seconds = time.perf_counter() - t0
        nbytes = opened.manifest.data_bytes
        log.info("rank %d: recovered step %d from %s in %.2f s (%d bytes)", rank, step, opened.source, seconds,
                 nbytes)
        try:
            client.recovered(step, seconds, nbytes, opened.source)
        except FtdError as exc:
            log.debug("could not report the recovery: %s", exc)
        return RestoreResult(step, seconds, nbytes, decoded, failures, opened.source, opened.manifest.meta)
    if local and not abstain:
        # Nothing is discarded here: a launch with the wrong model must not wipe good snapshots.
        log.error("rank %d: none of the held steps %s could be restored on every rank; starting from step 0",
                  rank, local)
    return RestoreResult(0, time.perf_counter() - t0, 0, None, failures)


def _gathered_view(opened: OpenedSnapshot, replicas: Replicas | None, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer | None) -> Callable[[str], torch.Tensor]:
    """`opened.view`, with the full tensors gathered from the replicas when the step is sharded.

    The gather writes straight into the live parameters and optimizer state (state.apply's copy
    onto itself is then free); `restore` has checked that the optimizer fits before.
    """
    if opened.layout is None or replicas is None:
        return opened.view
    into = state.live_tensors(opened.manifest, model, optimizer)
    full = gather.gather(opened.layout, opened.raw, replicas, into)
    return lambda name: full[name] if name in full else opened.view(name)


def _discard_above(client: DaemonClient, step: int) -> None:
    """Steps above the restored one belong to an abandoned timeline; drop them so retention stays right."""
    try:
        client.discard(step)
    except FtdError as exc:
        log.warning("could not discard snapshots above step %d: %s", step, exc)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_steps(local: list[int]) -> list[list[int]]:
    """Every rank's held steps (its newest MAX_STEPS_EXCHANGED), indexed by rank; `[local]` alone."""
    local = sorted(set(local), reverse=True)[:MAX_STEPS_EXCHANGED]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    mine = torch.full((MAX_STEPS_EXCHANGED,), -1, dtype=torch.int64, device=_collective_device())
    if local:
        mine[:len(local)] = torch.tensor(local, dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [[int(s) for s in other.tolist() if s >= 0] for other in gathered]


def agree_on_steps(local: list[int]) -> list[int]:
    """Steps held by every rank, newest first (just `local` without a process group)."""
    held = gather_steps(local)
    return sorted(set.intersection(*(set(steps) for steps in held)), reverse=True)


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` is true on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
