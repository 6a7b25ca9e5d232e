"""The recovery planner for pipeline-parallel jobs: memory first, CheckFree when memory is gone (docs/ARCHITECTURE.md §6).

Every stage process calls, once, in place of `Snapshotter.restore()`:

    tracker = GradNormTracker.attach(optimizer)
    snap = ftd.Snapshotter(stage_module, optimizer, scheduler=sched, extra=StageExtra(tracker, position))
    start = restore_pipeline(snap, stage=rank, stages=world)

The ranks exchange which steps each holds (locally or on an EC peer). When every stage holds a
common step this is an ordinary restore. When some stages hold nothing at all — their node and
more than `m` of its EC group were lost — and each of them is an intermediate stage whose two
neighbours survived, the survivors restore the newest step they all hold and every lost stage is
rebuilt with CheckFree from its neighbours' restored weights and the gradient norms stored in
their snapshots, with a fresh optimizer and a raised learning rate. That is a *degraded*
recovery: logged as a warning, reported to the daemon as source "checkfree", and training goes
on. Anything else (a lost edge stage, two adjacent lost stages, stages of different shapes)
falls back to a fresh start, with the reason in the log.

Nothing is pickled: shapes and norms travel as JSON bytes in uint8 tensors, weights as tensors,
over point-to-point torch.distributed calls between a lost stage and its neighbours.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ftd.client import jsonsafe
from ftd.client import restore as restore_mod
from ftd.errors import CheckFreeError, FtdError, ManifestError
from ftd.manifest import parse_json
from ftd.recovery.checkfree import DEFAULT_LR_SCALE, rebuild_intermediate, restart_optimizer
from ftd.recovery.gradnorm import GradNormTracker

log = logging.getLogger(__name__)

GRAD_NORM_KEY = "ftd_checkfree"
MAX_JSON_BYTES = 64 << 20


class StageExtra:
    """The Snapshotter `extra` of a pipeline stage: the user's values plus the stage's gradient norm.

    Called at each snapshot; after a restore `restored(values)` writes the user's values back
    into `user` (a dict) and the norm back into the tracker.
    """

    def __init__(self, tracker: GradNormTracker, user: dict[str, Any] | None = None):
        self.tracker, self.user = tracker, user if user is not None else {}

    def __call__(self) -> dict[str, Any]:
        if GRAD_NORM_KEY in self.user:
            raise ValueError(f"extra key {GRAD_NORM_KEY!r} is reserved for ftd")
        return {**self.user, GRAD_NORM_KEY: self.tracker.report()}

    def restored(self, values: Mapping[str, Any] | None) -> float | None:
        """Apply restored extra values; return the gradient norm they carried (None when absent)."""
        if not values:
            return None
        user = {k: v for k, v in values.items() if k != GRAD_NORM_KEY}
        self.user.clear()
        self.user.update(user)
        report = values.get(GRAD_NORM_KEY) or {}
        norm = report.get("grad_norm") if isinstance(report, Mapping) else None
        if isinstance(norm, (int, float)) and not isinstance(norm, bool):
            self.tracker.norm = float(norm)
            return float(norm)
        return None


def restore_pipeline(snap: Any, stage: int, stages: int, lr_scale: float = DEFAULT_LR_SCALE) -> int:
    """Restore stage `stage` of `stages` (one process per stage, rank == stage); return the step to resume from.

    Collective: every stage calls it. Never raises for a missing or unusable snapshot: the worst
    outcome is a fresh start (0) on every stage, logged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != stages:
        raise CheckFreeError("restore_pipeline needs torch.distributed initialised with one rank per stage")
    extra = snap.extra if isinstance(snap.extra, StageExtra) else None
    t0 = time.perf_counter()
    try:
        local = snap.client.list_steps(timeout=snap.config.restore_timeout) if snap.config.enabled else []
    except FtdError as exc:
        log.error("stage %d: cannot list snapshots (%s)", stage, exc)
        local = []
    held = restore_mod.gather_steps(local)
    lost = [s for s in range(stages) if not held[s]]
    if not lost or len(lost) == stages:
        step = snap.restore()
        if extra is not None:
            extra.restored(snap.restored_extra)
        return step
    reason = _why_not_rebuildable(lost, stages)
    wanted = _exchange_specs(snap.model, stage, lost) if reason is None else {}
    if not restore_mod.all_ranks_agree(reason is None and wanted is not None):
        log.error("stage %d: stages %s hold no snapshot and cannot be rebuilt with CheckFree (%s); "
                  "starting every stage from step 0", stage, lost, reason or "stage structures differ")
        return 0
    assert wanted is not None
    common = sorted(set.intersection(*(set(held[s]) for s in range(stages) if s not in lost)), reverse=True)
    mine_lost = stage in lost
    step = snap.restore(steps=common, abstain=mine_lost)
    if not restore_mod.all_ranks_agree(mine_lost or step > 0):
        log.error("stage %d: the surviving stages agree on no usable step; starting every stage from step 0", stage)
        return 0
    step = _agreed_step(step)
    norm = extra.restored(snap.restored_extra) if extra is not None and not mine_lost else None
    norms = _send_or_rebuild(snap, stage, lost, wanted, step, norm, extra)
    if norms is not None:
        if snap.optimizer is not None:
            restart_optimizer(snap.optimizer, lr_scale, snap.scheduler)
        seconds = time.perf_counter() - t0
        nbytes = sum(t.numel() * t.element_size() for t in snap.model.state_dict().values())
        log.warning("rank %d: recovered step %d from checkfree in %.2f s (%d bytes): degraded, stage %d rebuilt "
                    "from stages %d and %d (gradient norms %.4g, %.4g), fresh optimizer, lr x %.2f", stage, step,
                    seconds, nbytes, stage, stage - 1, stage + 1, norms[0], norms[1], lr_scale)
        snap.stats.restored_step, snap.stats.restore_s, snap.stats.restore_source = step, seconds, "checkfree"
        try:
            snap.client.recovered(step, seconds, nbytes, "checkfree")
        except FtdError as exc:
            log.debug("could not report the recovery: %s", exc)
    return step


def _why_not_rebuildable(lost: list[int], stages: int) -> str | None:
    for s in lost:
        if s in (0, stages - 1):
            return f"stage {s} is an edge stage (CheckFree+ copies are not kept by this job)"
        if s - 1 in lost or s + 1 in lost:
            return f"stage {s} lost a neighbour too"
    return None


def _spec(model: torch.nn.Module) -> list[list[Any]]:
    return [[k, str(v.dtype), list(v.shape)] for k, v in model.state_dict().items()]


def _exchange_specs(model: torch.nn.Module, stage: int, lost: list[int]) -> dict[int, list[str]] | None:
    """Each lost stage sends its neighbours its entries (name, dtype, shape); each neighbour checks it holds
    them alike (identical blocks). Returns, for a neighbour, the names each lost neighbour wants (in its
    order); None when this stage cannot stand in."""
    wanted: dict[int, list[str]] = {}
    ok = True
    mine = {k: (str(v.dtype), list(v.shape)) for k, v in model.state_dict().items()}
    for s in lost:
        if stage == s:
            blob = _json_tensor(_spec(model))
            for peer in (s - 1, s + 1):
                _send_blob(blob, peer)
        elif stage in (s - 1, s + 1):
            spec = _recv_json(s)
            differ = [k for k, dtype, shape in spec if mine.get(k) != (dtype, shape)]
            if differ:
                log.error("stage %d cannot stand in for lost stage %d: entries %s differ or are missing", stage, s,
                          differ[:5])
                ok = False
            wanted[s] = [k for k, _, _ in spec]
    return wanted if ok else None


def _agreed_step(step: int) -> int:
    """The survivors' restored step, known to every rank (lost ones restored nothing)."""
    value = torch.tensor([step], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _send_or_rebuild(snap: Any, stage: int, lost: list[int], wanted: dict[int, list[str]], step: int,
                     norm: float | None, extra: StageExtra | None) -> tuple[float, float] | None:
    """Neighbours send a lost stage their weights, gradient norm, scheduler and extra; it rebuilds itself.

    Returns the two neighbours' norms on a rebuilt stage, None elsewhere.
    """
    for s in lost:
        if stage in (s - 1, s + 1):
            sched = snap.scheduler.state_dict() if snap.scheduler is not None else None
            header = {"step": step, "grad_norm": norm, "scheduler": jsonsafe.encode(sched, "scheduler", _no_tensor),
                      "extra": jsonsafe.encode(dict(extra.user), "extra", _no_tensor) if extra is not None else None}
            _send_blob(_json_tensor(header), s)
            state = snap.model.state_dict()
            for name in wanted[s]:
                dist.send(state[name].detach().contiguous(), s)
    if stage not in lost:
        return None
    headers, states = [], []
    for peer in (stage - 1, stage + 1):
        headers.append(_recv_json(peer))
        received = {}
        for name, target in snap.model.state_dict().items():
            received[name] = torch.empty_like(target, memory_format=torch.contiguous_format)
            dist.recv(received[name], peer)
        states.append(received)
    norms = [h.get("grad_norm") for h in headers]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in norms):
        log.warning("stage %d: a neighbour's snapshot carries no gradient norm; weighting both equally", stage)
        norms = [1.0, 1.0]
    rebuilt = rebuild_intermediate(states[0], states[1], float(norms[0]), float(norms[1]),
                                   keys=list(snap.model.state_dict()))
    snap.model.load_state_dict(rebuilt)
    sched = jsonsafe.decode(headers[0].get("scheduler"), _no_source)
    if snap.scheduler is not None and sched is not None:
        snap.scheduler.load_state_dict(sched)
        for group, lr in zip(snap.optimizer.param_groups, sched.get("_last_lr") or []):
            group["lr"] = lr
    if extra is not None and headers[0].get("extra") is not None:
        extra.user.clear()
        extra.user.update(jsonsafe.decode(headers[0]["extra"], _no_source))
    return float(norms[0]), float(norms[1])


def _no_tensor(name: str, tensor: torch.Tensor) -> None:
    raise CheckFreeError(f"{name}: a tensor in the scheduler state or extra cannot be sent to a rebuilt stage")


def _no_source(name: str) -> torch.Tensor:
    raise CheckFreeError(f"{name}: unexpected tensor reference from a neighbour")


def _json_tensor(value: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def _send_blob(blob: torch.Tensor, peer: int) -> None:
    dist.send(torch.tensor([blob.numel()], dtype=torch.int64), peer)
    dist.send(blob, peer)


def _recv_json(peer: int) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, peer)
    if not 0 <= int(size.item()) <= MAX_JSON_BYTES:
        raise CheckFreeError(f"stage {peer} announced a {int(size.item())}-byte message")
    blob = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(blob, peer)
    try:
        return parse_json(blob.numpy().tobytes(), f"stage {peer}'s message", max_bytes=MAX_JSON_BYTES)
    except ManifestError as exc:
        raise CheckFreeError(str(exc)) from exc
