"""Restore: find the newest step every rank holds, verify it, load it; fall back when it is bad.

Verification (manifest bounds, job id, world size, checksums of every byte, shapes and dtypes
against the model, the sharding layout against the replica group) happens before anything is
written into the live objects (ftd.client.verifycopy: every chunk is hashed on several threads
through the read-only mapping; a fresh optimizer's state is copied into the tensors allocated for
it and hashed there, and the live tensors are copied into after the agreement and checked again
where the bytes landed), and the ranks agree on the outcome through torch.distributed
(all-gather of held steps, all-gather of layouts within the replica group, all-reduce of
"verified") so every rank loads the same step or none does. A sharded step is then gathered
from the replicas (ftd.client.gather) and loaded like any other.

restore() never raises into the training loop (a ConfigError aside): every check that applying
could fail is made before the agreement (state.check_apply); if applying still fails on any
rank, all ranks agree on that too and fall back to the previous step, whose apply overwrites
every entry. When no step applies, training starts from step 0 and, if a failed apply had
already written into the live objects, that is logged as an error and returned
(`RestoreResult.partial_step`). A daemon that is not up yet (restarting) is waited for, up to
`daemon_wait` seconds, before the held steps are listed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ftd.client import gather, jsonsafe, sharding, state, verifycopy
from ftd.client.rpc import DaemonClient
from ftd.client.segments import MappedSegment, torch_dtype
from ftd.client.sharding import Layout, Replicas
from ftd.errors import ConfigError, DaemonUnavailable, FtdError, OtherRun, SnapshotCorrupt, UntrustedDaemon
from ftd.manifest import Manifest

log = logging.getLogger(__name__)

MAX_STEPS_EXCHANGED = 64
WAIT_POLL_S = 0.5
WAIT_LOG_EVERY_S = 10.0


@dataclass
class RestoreResult:
    """What a restore did: the step resumed (0: a fresh start) and why newer steps were not used.

    `failures` are messages, one per problem met. `unusable` maps each step this rank could not
    use (it failed verification, its shards disagree with the replicas', or applying it failed)
    to the reason; steps other ranks could not use are not in it. `held` is the steps this
    rank's daemon listed (empty when it listed none or could not be reached), `gathered` tells
    whether the restored step was all-gathered from the replica group (sharded snapshots).
    `timings` splits the restored step's load in seconds: "map", "allocate" (a fresh optimizer's
    state), "verify" (every byte read and checked), "load" (read into the live tensors, checked
    again), "apply" (the rest of state.apply).
    """

    step: int
    seconds: float
    nbytes: int
    extra: dict[str, Any] | None
    failures: list[str]
    source: str = "none"
    meta: dict[str, Any] | None = None
    sealed_at: float | None = None  # the restored step's seal time (seconds since the epoch)
    partial_step: int | None = None  # a fresh start whose live objects hold part of this step (a failed apply)
    unusable: dict[int, str] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)
    gathered: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class OpenedSnapshot:
    """A sealed snapshot mapped read-only and verified.

    `fresh` holds the optimizer state entries that had no live tensor to go into, read (verified)
    into tensors allocated for them; `timings` splits the open: "map", "verify", "allocate" seconds.
    """

    def __init__(self, manifest: Manifest, segment: MappedSegment, source: str = "local",
                 layout: Layout | None = None, fresh: dict[str, torch.Tensor] | None = None,
                 timings: dict[str, float] | None = None):
        self.manifest, self.segment, self.source, self.layout = manifest, segment, source, layout
        self.fresh = fresh or {}
        self.timings = timings or {}
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
        self.fresh = {}
        self.segment.close()


def open_verified(client: DaemonClient, job: str, rank: int, world_size: int, step: int,
                  model: torch.nn.Module, timeout: float | None = None,
                  replicas: Replicas | None = None, run: str = "",
                  optimizer: torch.optim.Optimizer | None = None) -> OpenedSnapshot:
    """Open (job, rank, step) from the daemon and run every check; SnapshotCorrupt on the first failure.

    A sharded snapshot must fit `replicas` (same dp, same replica index). With a `run` identity,
    a snapshot of another run is refused (OtherRun) before any byte of it is read, unless it comes
    from the durable tier: that is the job's checkpoint across launches (a relaunch, a requeue).
    With an `optimizer`, its state entries that have no live tensor yet are read into new tensors
    while they are verified (OpenedSnapshot.fresh; nothing live is touched).
    """
    reply = client.open(step, timeout=timeout, world_size=world_size)
    manifest = Manifest.from_json(reply.manifest_json)
    if manifest.job != job:
        raise SnapshotCorrupt(f"snapshot belongs to job {manifest.job!r}, not {job!r}", rank=rank, step=step)
    if run and manifest.run != run and reply.source != "durable":
        raise OtherRun(f"rank {rank} step {step} was taken by run {manifest.run or '(none)'!r} of job {job!r}, "
                       f"this is run {run!r}: not resumed (launch with FTD_RUN={manifest.run or '...'} to resume "
                       f"it; `ftd rm {job}` discards it)")
    if (manifest.rank, manifest.step) != (rank, step):
        raise SnapshotCorrupt(f"manifest says rank {manifest.rank} step {manifest.step}", rank=rank, step=step)
    if manifest.world_size != world_size:
        raise SnapshotCorrupt(f"taken with world size {manifest.world_size}, this job runs {world_size} "
                              "(memory is restored at the same world size only; a durable step of another one is resharded "
                              "when FTD_DURABLE_DIR is set)", rank=rank, step=step)
    manifest.validate(reply.capacity)
    layout = sharding.check(manifest, replicas)
    t0 = time.perf_counter()
    try:
        segment = MappedSegment(reply.path, manifest.data_bytes, writable=False, trust=client.segment_trust())
    except (SnapshotCorrupt, OSError) as exc:
        raise SnapshotCorrupt(f"cannot map the segment: {exc}", rank=rank, step=step) from exc
    timings = {"map": time.perf_counter() - t0}
    try:
        state.check_model(manifest, model)
        t0 = time.perf_counter()
        fresh = fresh_optimizer_state(manifest, model, optimizer) if layout is None else {}
        verifycopy.prefault(fresh.values())
        timings["allocate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        verifycopy.verify(segment, manifest, into=fresh)
        timings["verify"] = time.perf_counter() - t0
    except BaseException:
        segment.close()
        raise
    return OpenedSnapshot(manifest, segment, reply.source or "local", layout, fresh, timings)


def fresh_optimizer_state(manifest: Manifest, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """New CPU tensors for the optimizer state entries that no live tensor would take (a fresh optimizer's).

    Allocated only (torch.empty; open_verified faults their pages in before reading into them). What the
    clone out of the segment made before: the optimizer's load_state_dict moves them to their parameters'
    devices. DTensor shards are left to state.apply.
    """
    meta = manifest.meta
    if optimizer is None or not isinstance(meta.get("optim"), dict) or "state" not in meta["optim"]:
        return {}
    named: list[str] = []
    jsonsafe.decode(meta["optim"]["state"], lambda name: named.append(name) or name)
    live = state.live_tensors(manifest, model, optimizer)
    dtensors = set(meta.get("dtensors", ()))
    entries = manifest.entry_map()
    out = {}
    for name in named:
        entry = entries.get(name)
        if entry is None or name in live or name in dtensors or entry.kind != "optim":
            continue
        out[name] = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    return out


def restore(client: DaemonClient, job: str, rank: int, world_size: int, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: state.Extra,
            restore_rng: bool = True, list_timeout: float | None = None,
            replicas: Replicas | None = None, steps: list[int] | None = None,
            abstain: bool = False, daemon_wait: float = 0.0, run: str = "", above: int = -1) -> RestoreResult:
    """Load the newest step that every rank holds and that verifies and applies everywhere; step 0 when none.

    With `replicas` (sharding configured; the same on every rank) a sharded step is gathered
    from the replica group. `steps` (the same list on every rank) replaces the exchange of held
    steps; an `abstain`ing rank loads nothing and agrees to whatever the others can load (the
    pipeline planner's lost stages, rebuilt afterwards). With a `run` identity, steps of another
    run of the job are skipped; only steps above `above` are considered (a newer step of another world
    size exists: ftd.client.memreshard). Never raises but ConfigError.
    """
    t0 = time.perf_counter()
    failures: list[str] = []
    unusable: dict[int, str] = {}
    if steps is not None:
        local = candidates = sorted(set(steps), reverse=True)
    else:
        local = [s for s in _list_held(client, rank, list_timeout, daemon_wait, failures, world_size) if s > above]
        candidates = agree_on_steps(local)
    partial: int | None = None
    for step in candidates:
        if abstain:  # take part in both agreements of the ranks that load
            if all_ranks_agree(True) and all_ranks_agree(True):
                return RestoreResult(0, time.perf_counter() - t0, 0, None, failures, held=local)
            continue
        opened = _open_checked(client, job, rank, world_size, step, model, optimizer, scheduler, extra,
                               restore_rng, list_timeout, replicas, failures, run)
        usable = opened is not None
        if not usable:
            unusable[step] = failures[-1]
        if replicas is not None and not gather.layouts_agree(opened.layout if opened else None, usable, replicas):
            if usable:
                log.error("rank %d: step %d is unusable: the replicas' snapshots are not sharded alike", rank, step)
                unusable[step] = "the replicas' snapshots are not sharded alike"
            usable = False
        if not all_ranks_agree(usable):
            if opened is not None:
                opened.close()
            log.warning("rank %d: falling back from step %d (not usable on every rank)", rank, step)
            continue
        assert opened is not None
        applied, decoded = False, None
        try:
            view = _gathered_view(opened, replicas, model, optimizer)
            t_apply = time.perf_counter()
            decoded = state.apply(opened.manifest, view, model, optimizer, scheduler, extra, restore_rng,
                                  owned=set(opened.fresh))
            opened.timings["apply"] = time.perf_counter() - t_apply
            applied = True
        except Exception as exc:  # noqa: BLE001 - the training loop is never raised into
            log.error("rank %d: applying step %d failed: %s: %s", rank, step, type(exc).__name__, exc)
            failures.append(f"step {step}: apply failed: {exc!r}")
            unusable[step] = f"apply failed: {exc!r}"
        finally:
            opened.close()
        if not all_ranks_agree(applied):
            partial = step  # every rank wrote (part of) this step into its live objects
            log.warning("rank %d: falling back from step %d (it could not be applied on every rank)", rank, step)
            continue
        _discard_above(client, step)
        seconds = time.perf_counter() - t0
        manifest = opened.manifest
        log.info("rank %d: recovered step %d from %s in %.2f s (%d bytes): resuming job %r (sealed %s, %s ago)",
                 rank, step, opened.source, seconds, manifest.data_bytes, manifest.job, _when(manifest.created_at),
                 _ago(manifest.created_at))
        try:
            client.recovered(step, seconds, manifest.data_bytes, opened.source)
        except FtdError as exc:
            log.debug("could not report the recovery: %s", exc)
        return RestoreResult(step, seconds, manifest.data_bytes, decoded, failures, opened.source, manifest.meta,
                             manifest.created_at or None, unusable=unusable, held=local,
                             gathered=opened.layout is not None and replicas is not None,
                             timings=dict(opened.timings))
    if local and not abstain:
        # Nothing is discarded here: a launch with the wrong model must not wipe good snapshots.
        log.error("rank %d: none of the held steps %s could be restored on every rank; starting from step 0",
                  rank, local)
    if partial is not None:
        log.error("rank %d: starting from step 0, but the model/optimizer/scheduler hold part of step %d from an "
                  "apply that failed; re-create them before training for a clean fresh start", rank, partial)
    return RestoreResult(0, time.perf_counter() - t0, 0, None, failures, partial_step=partial, unusable=unusable,
                         held=local)


def _open_checked(client: DaemonClient, job: str, rank: int, world_size: int, step: int, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: state.Extra,
                  restore_rng: bool, timeout: float | None, replicas: Replicas | None,
                  failures: list[str], run: str = "") -> OpenedSnapshot | None:
    """open_verified plus every check applying makes (state.check_apply); None when any fails."""
    opened = None
    try:
        opened = open_verified(client, job, rank, world_size, step, model, timeout, replicas, run, optimizer)
        state.check_apply(opened.manifest, opened.view, model, optimizer, scheduler, extra, restore_rng)
        return opened
    except ConfigError:
        if opened is not None:
            opened.close()
        raise
    except Exception as exc:  # noqa: BLE001 - FtdError, or anything a hostile manifest provokes
        if opened is not None:
            opened.close()
        text = str(exc) if isinstance(exc, FtdError) else f"{type(exc).__name__}: {exc}"
        log.error("rank %d: step %d is unusable: %s", rank, step, text)
        failures.append(text)
        return None


def _list_held(client: DaemonClient, rank: int, timeout: float | None, daemon_wait: float,
               failures: list[str], world_size: int = 0) -> list[int]:
    """This rank's held steps, waiting up to `daemon_wait` s for a daemon that is not up; [] when it never is."""
    t0 = time.monotonic()
    next_log = t0 + WAIT_LOG_EVERY_S
    waited = False
    while True:
        try:
            held = client.list_steps(timeout=timeout, world_size=world_size)
            if waited:
                log.info("rank %d: the daemon is up after %.0f s; restoring", rank, time.monotonic() - t0)
            return held
        except UntrustedDaemon as exc:  # waiting would not make it trustworthy
            log.error("rank %d: not restoring from the daemon: %s; this rank has nothing to restore", rank, exc)
            failures.append(str(exc))
            return []
        except DaemonUnavailable as exc:
            now = time.monotonic()
            if now - t0 >= max(daemon_wait, 0.0):
                log.error("rank %d: cannot list snapshots (%s)%s; this rank has nothing to restore", rank, exc,
                          f" after waiting {daemon_wait:.0f} s" if daemon_wait > 0 else "")
                failures.append(str(exc))
                return []
            if not waited:
                log.warning("rank %d: the daemon at unix:%s is not up (%s); waiting up to %.0f s for it "
                            "(daemon_wait) before restoring", rank, client.socket_path, exc, daemon_wait)
                waited = True
            elif now >= next_log:
                log.warning("rank %d: still waiting for the daemon (%.0f of %.0f s)", rank, now - t0, daemon_wait)
                next_log = now + WAIT_LOG_EVERY_S
            time.sleep(min(WAIT_POLL_S, max(daemon_wait - (now - t0), 0.0)))
        except ConfigError:
            raise
        except FtdError as exc:
            log.error("rank %d: cannot list snapshots (%s); this rank has nothing to restore", rank, exc)
            failures.append(str(exc))
            return []


def _when(created_at: float) -> str:
    if not created_at:
        return "at an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_at))


def _ago(created_at: float) -> str:
    if not created_at:
        return "?"
    return f"{max(time.time() - created_at, 0.0):.0f} s"


def _gathered_view(opened: OpenedSnapshot, replicas: Replicas | None, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer | None) -> Callable[[str], torch.Tensor]:
    """`opened.view`, with the live tensors already loaded (or, when the step is sharded, gathered from
    the replicas) and the fresh optimizer state filled at verify.

    The load or the gather writes straight into the live parameters and optimizer state (state.apply's
    copy onto itself is then free); `restore` has checked that the optimizer fits before.
    """
    if opened.layout is None or replicas is None:
        return loaded_view(opened, model, optimizer)
    into = state.live_tensors(opened.manifest, model, optimizer)
    full = gather.gather(opened.layout, opened.raw, replicas, into)
    return lambda name: full[name] if name in full else opened.view(name)


def loaded_view(opened: OpenedSnapshot, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None) -> Callable[[str], torch.Tensor]:
    """Read the live tensors' entries into them (verifycopy.load); a view returning those, the fresh
    tensors, and segment views for the rest. Times the load as opened.timings["load"]."""
    t0 = time.perf_counter()
    targets = state.live_tensors(opened.manifest, model, optimizer)
    loaded = verifycopy.load(opened.segment, opened.manifest, targets)
    opened.timings["load"] = time.perf_counter() - t0
    fresh = opened.fresh

    def view(name: str) -> torch.Tensor:
        if name in fresh:
            return fresh[name]
        return targets[name] if name in loaded else opened.view(name)
    return view


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
