"""`ftd.Snapshotter`: the trainer-facing API (docs/ARCHITECTURE.md §3.1).

    snap = ftd.Snapshotter(model, optimizer, scheduler=sched, extra=loader_state)
    start = snap.restore()
    for step in range(start, steps):
        ...; optimizer.step(); sched.step()
        snap.snapshot(step + 1)

`snapshot()` returns at once; the copy runs on a background thread while the next
forward/backward computes, and a pre-hook on `optimizer.step` waits for it (the *stall*).
ftd never raises into the training loop: a failed snapshot is logged, counted and skipped.

With `shard_replicated=True` (plain data parallelism) or `replica_group=` (the ranks that hold
identical state, e.g. the replicate dimension of HSDP) each replica snapshots only its share
of the parameters and optimizer state (ftd.client.sharding); restore gathers them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from ftd.client import ddp as ddp_mod
from ftd.client import jsonsafe
from ftd.client import restore as restore_mod
from ftd.client import expected, memreshard, placement, reshard, sharding, state
from ftd.client.copier import CopyEngine, CopyJob, SkipStep
from ftd.client.rpc import DaemonClient
from ftd.client.sharding import Replicas
from ftd.config import ClientConfig
from ftd.errors import ConfigError
from ftd.manifest import check_metrics

log = logging.getLogger(__name__)


@dataclass
class SnapshotStats:
    """What the Snapshotter has done so far. `stalls_s` holds the most recent stalls.

    The restore_* fields describe the last `restore()` (ftd.client.restore.RestoreResult):
    `restore_unusable` maps each step this rank could not use to the reason, `restore_held` is
    the steps its daemon listed, `restore_gathered` whether the step was gathered from the
    replica group. `to_json()` gives all of it as JSON-safe values, for results files.
    The counters are updated under `lock`; hold it to read several of them consistently.
    """

    requested: int = 0
    sealed: int = 0
    skipped: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    last_sealed_step: int | None = None
    last_bytes: int = 0
    last_copy_s: float = 0.0
    stalls_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    restored_step: int | None = None
    restore_s: float = 0.0
    restore_source: str = "none"
    restore_sealed_at: float | None = None  # seal time of the restored step (seconds since the epoch)
    restore_partial_step: int | None = None  # a fresh start over live objects holding part of this step
    restore_failures: list[str] = field(default_factory=list)  # why newer steps were not restored
    restore_unusable: dict[int, str] = field(default_factory=dict)  # step -> why this rank could not use it
    restore_held: list[int] = field(default_factory=list)  # the steps this rank's daemon listed at the restore
    restore_gathered: bool = False  # the restored step was all-gathered from the replica group
    restore_resharded: bool = False  # the restored step was taken by another world size (memory or durable tier)
    restore_old_world: int = 0  # the world size that took the resharded step (0: not resharded)
    restore_moved: dict[str, int] = field(default_factory=dict)  # a reshard from memory: bytes by source
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def median_stall_s(self) -> float:
        with self.lock:
            stalls = list(self.stalls_s)
        return statistics.median(stalls) if stalls else 0.0

    @property
    def last_stall_s(self) -> float:
        with self.lock:
            return self.stalls_s[-1] if self.stalls_s else 0.0

    def to_json(self) -> dict[str, Any]:
        """Every counter and the last restore's facts as JSON-safe values (steps as int keys become strings)."""
        with self.lock:
            doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lock", "stalls_s")}
            doc["skip_reasons"] = dict(self.skip_reasons)
            doc["restore_unusable"] = {str(k): v for k, v in self.restore_unusable.items()}
            doc["restore_failures"] = list(self.restore_failures)
            doc["restore_held"] = list(self.restore_held)
            doc["stalls"] = len(self.stalls_s)
        doc["median_stall_s"] = self.median_stall_s
        return doc


class Snapshotter:
    """Snapshots a model, its optimizer, scheduler, RNG and `extra` into the node's ftd daemon.

    `extra` is a dict of JSON-safe values and tensors (restored in place) or a callable returning
    one. Settings come from keyword arguments, then `FTD_*` variables (see ftd.config).

    Sharding of replicated state: `shard_replicated=True` (FTD_SHARD_REPLICATED=1) declares that
    every rank of the default process group holds the same parameters and optimizer state (DDP);
    `replica_group=` names a ProcessGroup of ranks that do (hybrid layouts). Each of its dp ranks
    then snapshots ~1/dp of them. A ZeroRedundancyOptimizer's partition is never sharded, nor are
    DTensor (FSDP) shards unless `replica_group` is given. Every rank must use the same setting.

    `ddp=` is the DistributedDataParallel wrapping `model` (found by itself when `model` is one): its
    gradient buckets are recorded with each snapshot and rebuilt on restore, so a resumed run
    all-reduces as the uninterrupted one did and stays bit for bit (ftd.client.ddp).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 scheduler: Any | None = None, extra: state.Extra = None, rank: int | None = None,
                 world_size: int | None = None, replica_group: dist.ProcessGroup | None = None,
                 reshard_extra: reshard.ReshardExtra | None = None,
                 ddp: torch.nn.parallel.DistributedDataParallel | None = None, **settings: Any):
        self.config = ClientConfig.load(**settings)
        if not math.isfinite(self.config.daemon_wait) or self.config.daemon_wait < 0:
            raise ConfigError(f"daemon_wait must be a finite number of seconds >= 0, got {self.config.daemon_wait}")
        logging.getLogger("ftd").setLevel(self.config.log_level.upper())
        self.model, self.optimizer, self.scheduler, self.extra = model, optimizer, scheduler, extra
        self._state_optimizer = _local_optimizer(optimizer)
        self.rank = _rank() if rank is None else rank
        self.world_size = _world_size() if world_size is None else world_size
        self.replicas = _replicas(self.config.shard_replicated, replica_group)
        self._shard_dtensors = replica_group is not None
        self._copies = self.replicas or _ddp_replicas(model, self.rank, self.world_size)
        self._reshard_extra = reshard_extra
        wrapper = ddp_mod.find(model, ddp)
        self._buckets = ddp_mod.BucketKeeper(wrapper) if wrapper is not None else None
        self.stats = SnapshotStats()
        self._lock = self.stats.lock  # guards _inflight and the stats the copy and training threads update
        self._inflight: CopyJob | None = None
        self._encode_cache = state.EncodeCache()  # used by the copy thread alone (_encode)
        self._unmeasured: CopyJob | None = None  # latest job whose stall the next optimizer.step measures
        self.restored_extra: dict[str, Any] | None = None
        self._pending_stall = -1.0
        self._closed = False
        self._restored = False
        self._rng_at_start = torch.random.get_rng_state()  # to tell a batch fetched before restore()
        self.client = DaemonClient(self.config.socket, self.config.job, self.rank, self.config.rpc_timeout,
                                   self.config.daemon_user, self.config.socket_dir_private)
        self._engine = CopyEngine(self.client, self.config, self.rank, self._on_done) if self.config.enabled else None
        self._hook = optimizer.register_step_pre_hook(self._before_step) if optimizer is not None else None
        self.prepared = self._prepare_ahead()
        log.debug("rank %d/%d snapshotting into unix:%s (job %r)", self.rank, self.world_size, self.config.socket,
                  self.config.job)

    def _prepare_ahead(self) -> Any:
        """Announce the state's estimated size so the daemon prepares (and this rank maps) its segments
        before the first snapshot (ftd.client.expected); the copier's Prepare, or None when not announced
        (disabled, unknown size, or state sharded over replicas)."""
        if self._engine is None or (self.replicas is not None and self.replicas.size > 1):
            return None
        try:
            nbytes = expected.expected_bytes(self.model, self._state_optimizer)
        except Exception as exc:  # noqa: BLE001 - only a head start is lost
            log.info("rank %d: the state's size could not be estimated (%s); nothing prepared ahead", self.rank, exc)
            return None
        return self._engine.prepare(nbytes, self.world_size) if nbytes else None

    # ---- taking snapshots -------------------------------------------------------------------

    def snapshot(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Start an asynchronous snapshot of the state *after* `step` steps. Never raises.

        `metrics` (e.g. `{"loss": 2.31}`) are recorded in the step's manifest, and so in the durable
        tier, for `ftd merge --method weighted`: at most 64 names of 1..128 printable characters, each
        a number (a one-element tensor is read with `.item()`; NaN and ±inf are kept).
        A step that cannot be captured is skipped and counted in `stats.skip_reasons`: "extra"
        (the `extra` callable raised), "capture" (a value that cannot be stored: an unsupported
        type, nesting deeper than jsonsafe.MAX_DEPTH or a cycle), "metrics" (`metrics` is not as
        above), "error" (anything else).
        """
        try:
            self._snapshot(step, metrics)
        except Exception as exc:  # noqa: BLE001 - the training loop is never raised into
            self._skip(step, "error", f"unexpected {type(exc).__name__}: {exc}", exc_info=True)

    def _snapshot(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if self._engine is None or self._closed:
            return
        buckets = self._buckets.buckets() if self._buckets is not None else None  # before any skip: a collective
        with self._lock:
            self.stats.requested += 1
        try:
            recorded = _metrics(metrics)
        except (TypeError, ValueError) as exc:
            self._skip(step, "metrics", f"bad metrics: {exc}")
            return
        self._wait_copied(self._inflight, "snapshot")
        try:
            extra = self.extra() if callable(self.extra) else self.extra
        except Exception as exc:  # noqa: BLE001 - the user's callable
            self._skip(step, "extra", f"the extra callable raised {type(exc).__name__}: {exc}")
            return
        try:  # only what may change before the next optimizer.step is taken here; the copy thread encodes it
            frozen = state.freeze(step, self.model, self._state_optimizer, self.scheduler, extra)
            outer = None
            if self._state_optimizer is not self.optimizer and self.optimizer is not None:
                outer = jsonsafe.freeze([{k: v for k, v in g.items() if k != "params"}
                                         for g in self.optimizer.param_groups])
        except (TypeError, ValueError, RecursionError) as exc:
            self._skip(step, "capture", f"state cannot be captured: {type(exc).__name__}: {exc}")
            return
        ready = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream())
        job = CopyJob(None, self.world_size, self._pending_stall, cuda_ready=ready, step=step,
                      prepare=lambda: self._encode(frozen, outer, recorded, buckets))
        self._pending_stall = -1.0
        with self._lock:
            self._inflight = self._unmeasured = job
        self._engine.submit(job)
        if self.optimizer is None:  # nothing tells us when the state changes next: copy now
            self._wait_copied(job, "snapshot without optimizer")

    def _encode(self, frozen: state.Frozen, outer: Any, recorded: dict[str, float],
                buckets: list[list[int]] | None = None) -> state.Captured:
        """On the copy thread, before the copy: entries, meta, shards and placements of a frozen step."""
        try:
            captured = state.encode(frozen, self.model, self._state_optimizer, self._encode_cache)
            if outer is not None:
                captured.meta["outer_param_groups"] = jsonsafe.encode(outer, "outer_groups", _refuse_tensor)
            if buckets is not None:
                captured.meta[ddp_mod.META_KEY] = buckets
            if self.replicas is not None and self.replicas.size > 1:
                sharding.shard(captured, self.replicas, self._shardable(captured))
            placement.assign(captured, self._copies, self._replicated)
            captured.metrics = recorded
        except (TypeError, ValueError, RecursionError) as exc:
            raise SkipStep("capture", f"state cannot be captured: {type(exc).__name__}: {exc}") from None
        return captured

    def _shardable(self, captured: state.Captured) -> Callable[[str], bool]:
        """Which captured entries are identical on every replica: live parameters and optimizer state,
        less a ZeRO optimizer's own partition and (without an explicit replica group) DTensor shards."""
        zero = self._state_optimizer is not self.optimizer

        def shardable(name: str) -> bool:
            return (name in captured.live and (self._shard_dtensors or name not in captured.dtensors)
                    and not (zero and name.startswith("optim/")))
        return shardable

    def _replicated(self, name: str) -> bool:
        """Entries every replica holds a bit-identical copy of: the model, and the optimizer state but a ZeRO partition."""
        return name.startswith("model/") or (name.startswith("optim/") and self._state_optimizer is self.optimizer)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the snapshot in flight is sealed or skipped; True when nothing is left in flight."""
        job = self._inflight
        return job is None or job.finished.wait(self.config.max_stall if timeout is None else timeout)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            job, self._unmeasured = self._unmeasured, None
            if job is not None:
                stall = self._wait_copied(job, "optimizer.step")
                with self._lock:
                    self.stats.stalls_s.append(stall)
                self._pending_stall = stall
        except Exception:  # noqa: BLE001 - runs inside optimizer.step
            log.exception("rank %d: the optimizer.step pre-hook failed; training continues", self.rank)

    def _wait_copied(self, job: CopyJob | None, why: str) -> float:
        """Wait (bounded by max_stall) until `job` no longer reads the live tensors; return the wait."""
        if job is None or job.copied.is_set():
            return 0.0
        t0 = time.perf_counter()
        if not job.copied.wait(self.config.max_stall):
            job.abandon.set()
            log.warning("rank %d: %s waited %.0f s for the copy of step %d; abandoning that snapshot",
                        self.rank, why, self.config.max_stall, job.step)
        return time.perf_counter() - t0

    def _on_done(self, job: CopyJob) -> None:
        with self._lock:
            if self._inflight is job:
                self._inflight = None
            if job.outcome == "sealed":
                self.stats.sealed += 1
                self.stats.last_sealed_step = job.step
                self.stats.last_bytes = job.nbytes
                self.stats.last_copy_s = job.copy_seconds
                return
        self._skip(job.step, job.outcome.removeprefix("skipped:"), job.detail or None)

    def _skip(self, step: int, reason: str, message: str | None, exc_info: bool = False) -> None:
        """Count a skipped step; the first skip of each reason is a warning, later ones debug lines."""
        with self._lock:
            self.stats.skipped += 1
            self.stats.skip_reasons[reason] += 1
            first = self.stats.skip_reasons[reason] == 1
        if message:
            log.log(logging.WARNING if first else logging.DEBUG,
                    "rank %d: snapshot of step %d skipped: %s%s", self.rank, step, message,
                    " (further skips for this reason are counted in stats.skip_reasons, not logged)" if first else "",
                    exc_info=exc_info and first)

    # ---- restoring --------------------------------------------------------------------------

    def restore(self, restore_rng: bool = True, *, steps: list[int] | None = None, abstain: bool = False) -> int:
        """Load the newest step every rank holds into model, optimizer, scheduler, RNG and extra.

        Returns that step (0 when there is nothing to restore). With `restore_rng=False` the RNG
        state is left alone; call `restore_rng()` later (e.g. after creating the data iterator).
        `steps` and `abstain` are for recovery planners (ftd.recovery.pipeline): the candidate
        steps every rank already agreed on, and a rank that loads nothing but takes part.
        Raises ConfigError when a first restore (no snapshot taken yet) with `restore_rng` loads a
        step although the torch RNG was drawn from since construction (a batch fetched too early).
        """
        if abstain and self.replicas is not None:
            raise ConfigError("a rank with sharded replicated state cannot abstain from a restore")
        if self._engine is None:
            return 0
        first = not self._restored and steps is None and not abstain and self.stats.requested == 0
        drawn = first and restore_rng and not torch.equal(self._rng_at_start, torch.random.get_rng_state())
        self._restored = True
        self.wait()
        plain = steps is None and not abstain  # a recovery planner's restore stays within its own world
        newer_elsewhere = memreshard.probe(self.client, self.world_size, self.config.restore_timeout) if plain else -1
        result = self._restore_same_world(restore_rng, steps, abstain, newer_elsewhere)
        old_world, moved = 0, {}
        if not result.step and plain:
            mem = memreshard.restore(self.client, self.config.job, self.rank, self.world_size, self.model,
                                     self._state_optimizer, self.scheduler, self.extra, restore_rng,
                                     self._reshard_extra, self.config.restore_timeout, self.config.run)
            if mem is not None:
                result = dataclasses.replace(result, step=mem.step, seconds=result.seconds + mem.seconds,
                                             extra=mem.extra, source="peers" if mem.moved.peers else "local",
                                             meta=None, nbytes=mem.moved.total)
                old_world = mem.old_world
                moved = {"local": mem.moved.local, "peers": mem.moved.peers, "decoded": mem.moved.decoded}
            elif newer_elsewhere >= 0:  # that newer step did not load: an older one of this world may
                result = self._restore_same_world(restore_rng, steps, abstain, -1)
        if not result.step and not abstain and self.config.durable_dir:
            step, seconds, decoded = reshard.restore(self.config.durable_dir, self.config.job, self.rank,
                                                     self.world_size, self.model, self._state_optimizer,
                                                     self.scheduler, self.extra, restore_rng, self._reshard_extra)
            if step:
                result = dataclasses.replace(result, step=step, seconds=result.seconds + seconds, extra=decoded,
                                             source="durable", meta=None)
                old_world = -1
        outer_groups = (result.meta or {}).get("outer_param_groups")
        if result.step and outer_groups is not None and self.optimizer is not None:
            # ZeRO: the outer optimizer's groups (what schedulers change) as they were at the snapshot; its
            # next step pushes them into the restored partition's optimizer.
            for group, saved in zip(self.optimizer.param_groups, jsonsafe.decode(outer_groups, _no_tensors)):
                group.update(saved)
        with self._lock:
            self.stats.restored_step, self.stats.restore_s = result.step, result.seconds
            self.stats.restore_source = result.source
            self.stats.restore_sealed_at, self.stats.restore_partial_step = result.sealed_at, result.partial_step
            self.stats.restore_failures = list(result.failures)
            self.stats.restore_unusable = dict(result.unusable)
            self.stats.restore_held = list(result.held)
            self.stats.restore_gathered = result.gathered
            self.stats.restore_resharded = old_world != 0
            self.stats.restore_old_world = max(old_world, 0)
            self.stats.restore_moved = moved
        self.restored_extra = result.extra
        if self._buckets is not None and result.step and result.meta is not None:
            self._buckets.apply(result.meta.get(ddp_mod.META_KEY))
        if drawn and result.step:
            raise ConfigError(
                f"restore() loaded step {result.step}, but the torch RNG was drawn from between creating the "
                "Snapshotter and restore(): a batch was fetched (a shuffling DataLoader draws on its first "
                "batch) or something random ran before the restore, and the loop would go on with the wrong "
                "data or RNG. Call restore() before fetching the first batch; or, when the data iterator must "
                "exist first, call restore(restore_rng=False), build the iterator, skip the batches done and "
                "call restore_rng()")
        return result.step

    def _restore_same_world(self, restore_rng: bool, steps: list[int] | None, abstain: bool,
                            above: int) -> restore_mod.RestoreResult:
        return restore_mod.restore(self.client, self.config.job, self.rank, self.world_size, self.model,
                                   self._state_optimizer, self.scheduler, self.extra, restore_rng,
                                   self.config.restore_timeout, self.replicas, steps, abstain,
                                   self.config.daemon_wait, self.config.run, above)

    def restore_rng(self) -> None:
        """Apply the RNG state of the restored step (after `restore(restore_rng=False)`)."""
        step = self.stats.restored_step
        if not step:
            return
        try:
            opened = restore_mod.open_verified(self.client, self.config.job, self.rank, self.world_size, step,
                                               self.model, replicas=self.replicas, run=self.config.run)
            try:
                state.apply_rng(opened.manifest.meta["rng"], lambda name: opened.view(name).clone())
            finally:
                opened.close()
        except Exception as exc:  # noqa: BLE001 - the training loop is never raised into
            log.error("rank %d: the RNG state of step %d could not be applied (%s); the generators keep "
                      "their current state", self.rank, step, exc)

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Wait for the snapshot in flight (bounded), stop the copy thread, remove the hook."""
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
        if self._engine is not None:
            self.wait(timeout)
            self._engine.close(self.config.rpc_timeout if timeout is None else timeout)
        self.client.close()

    def __enter__(self) -> Snapshotter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """`snapshot(metrics=)` as the manifest records it: numbers (a one-element tensor's `.item()`), checked."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    values: dict[Any, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype == torch.bool:
                raise ValueError(f"metric {name!r} is a tensor of {value.numel()} elements ({value.dtype}), "
                                 "not one number")
            value = value.detach().item()
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)  # NumPy scalars and other real numbers
        values[name] = value
    return check_metrics(values)


def _refuse_tensor(name: str, tensor: torch.Tensor) -> None:
    raise TypeError(f"{name}: tensors in the optimizer's param_groups are not supported with ZeRO")


def _no_tensors(name: str) -> torch.Tensor:
    raise TypeError(f"{name}: unexpected tensor reference")


def _local_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer whose state this rank holds.

    ZeroRedundancyOptimizer keeps each rank's partition in `.optim` (its own `state_dict()` needs a
    collective consolidation first): a rank snapshots and restores just its partition. The
    pre-hook stays on the outer optimizer, whose step mutates the parameters.
    """
    # Recognised by name: importing torch.distributed.optim costs time and deprecation warnings for everyone.
    kind = type(optimizer)
    if kind.__name__ == "ZeroRedundancyOptimizer" and kind.__module__.startswith("torch.distributed.optim"):
        return optimizer.optim  # type: ignore[union-attr]
    return optimizer


def _replicas(shard_replicated: bool, group: dist.ProcessGroup | None) -> Replicas | None:
    """The replica group whose ranks share the snapshot of their identical state; None: no sharding."""
    if group is not None:
        if not dist.is_initialized():
            raise ConfigError("replica_group needs an initialised torch.distributed process group")
        index = dist.get_rank(group)
        if index < 0:
            raise ConfigError("this rank is not a member of replica_group")
        return Replicas(dist.get_world_size(group), index, group)
    if not shard_replicated:
        return None
    if dist.is_available() and dist.is_initialized():
        return Replicas(dist.get_world_size(), dist.get_rank())
    return Replicas(1, 0)


def _ddp_replicas(model: torch.nn.Module, rank: int, world_size: int) -> Replicas | None:
    """Every rank of a DistributedDataParallel model holds the same parameters, buffers and optimizer state."""
    if world_size > 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return Replicas(world_size, rank)
    return None


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
