"""CheckFree: rebuild a lost pipeline stage from its neighbours when no snapshot of it survives.

A lost intermediate stage i becomes, entry by entry of the state dict, the average of stages
i-1 and i+1 weighted by their gradient norms (see `GradNormTracker`):

    W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b),  a = |g_{i+1}| + EPS,  b = |g_{i-1}| + EPS

A lost first or last stage (CheckFree+) becomes a copy of its neighbour plus the copy of its
(de)embedding layers that the neighbour keeps (`edge_extras`). Either way the rebuilt stage
restarts its optimizer with a raised learning rate (`restart_optimizer`); neighbours are untouched.

Everything works on state dicts, so a stage process needs only what its neighbours send: their
`state_dict()` tensors and their norms as floats.

Arithmetic, identical on every replica and on CPU and CUDA alike. The coefficients are Python
floats (IEEE float64): `a`, `b` as above, then `wa = a / (a + b)` and `wb = b / (a + b)`. A floating
(or complex) entry is computed as `next.double() * wa + prev.double() * wb` in float64
(complex128): an elementwise multiply, a multiply, an add, each rounded once; no division by a
scalar, which CUDA turns into a multiply by the reciprocal. The result is cast back to the entry's
dtype with `Tensor.to` (round to nearest even). Integer and bool entries (step counters, index
buffers) are not averaged: they are copied from the neighbour with the larger coefficient, the
previous stage on a tie.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch

from ftd.errors import CheckFreeError

EPS = 1e-4
DEFAULT_LR_SCALE = 1.1

StateDict = Mapping[str, torch.Tensor]


def neighbours(stage: int, num_stages: int) -> tuple[int, int]:
    """The (previous, next) stages CheckFree rebuilds intermediate `stage` from."""
    _check_stage(stage, num_stages)
    if stage == 0 or stage == num_stages - 1:
        raise CheckFreeError(f"stage {stage} of {num_stages} is an edge stage with one neighbour: "
                             "rebuild it with rebuild_edge (CheckFree+)")
    return stage - 1, stage + 1


def edge_neighbour(stage: int, num_stages: int) -> int:
    """The stage whose copy a lost first or last `stage` becomes (CheckFree+)."""
    _check_stage(stage, num_stages)
    if num_stages < 2:
        raise CheckFreeError("a pipeline of one stage has no neighbour to rebuild from")
    if stage == 0:
        return 1
    if stage == num_stages - 1:
        return num_stages - 2
    raise CheckFreeError(f"stage {stage} of {num_stages} is intermediate: rebuild it with rebuild_intermediate")


def coefficients(prev_norm: float, next_norm: float) -> tuple[float, float]:
    """The weights (wb, wa) of the previous and the next stage; they sum to 1 up to rounding."""
    b = _norm(prev_norm, "previous") + EPS
    a = _norm(next_norm, "next") + EPS
    total = a + b
    return b / total, a / total


def rebuild_intermediate(prev_state: StateDict, next_state: StateDict, prev_norm: float, next_norm: float, *,
                         keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a lost intermediate stage, from its neighbours' state dicts and gradient norms.

    `keys` are the lost stage's entries (default: the neighbours', which must then be the same);
    each must exist in both neighbours with the same shape, dtype and device. Neighbours' extra
    entries (e.g. the embedding of a first stage) are ignored when `keys` is given. The inputs
    are not modified and the result shares no memory with them.
    """
    wb, wa = coefficients(prev_norm, next_norm)
    names = _entry_names(prev_state, next_state, keys, "previous", "next")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        prev, nxt = _pair(prev_state, next_state, name)
        if prev.is_floating_point() or prev.is_complex():
            wide = torch.complex128 if prev.is_complex() else torch.float64
            mixed = torch.add(torch.mul(nxt.detach().to(wide), wa), torch.mul(prev.detach().to(wide), wb))
            out[name] = mixed.to(prev.dtype)
        else:
            out[name] = (prev if wb >= wa else nxt).detach().clone()
    return out


def edge_extras(edge_state: StateDict, neighbour_state: StateDict) -> dict[str, torch.Tensor]:
    """Copies of the edge stage's entries its neighbour lacks: the (de)embedding layers it keeps.

    Entries both stages have are their identical blocks and must match in shape and dtype.
    Refresh the copy as often as the neighbour can afford; a rebuilt edge is as old as it.
    """
    shared = [name for name in edge_state if name in neighbour_state]
    for name in shared:
        _pair(edge_state, neighbour_state, name)
    return {name: _tensor(edge_state, name).detach().clone() for name in edge_state if name not in neighbour_state}


def rebuild_edge(neighbour_state: StateDict, kept: StateDict, *,
                 keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a lost first or last stage (CheckFree+): its neighbour's blocks plus `kept`.

    `kept` is what `edge_extras` returned. `keys` are the lost stage's entries (default: the
    neighbour's and the kept ones); each must come from exactly one of the two.
    """
    overlap = sorted(set(kept) & set(neighbour_state))
    if overlap and keys is None:
        raise CheckFreeError(f"the kept edge entries overlap the neighbour's: {_few(overlap)}")
    names = list(keys) if keys is not None else [*neighbour_state, *kept]
    out: dict[str, torch.Tensor] = {}
    missing = []
    for name in names:
        source = kept if name in kept else neighbour_state
        if name not in source:
            missing.append(name)
            continue
        out[name] = _tensor(source, name).detach().clone()
    if missing:
        raise CheckFreeError(f"neither the neighbour nor the kept copy holds {_few(missing)}")
    return out


def restart_optimizer(optimizer: torch.optim.Optimizer, lr_scale: float = DEFAULT_LR_SCALE,
                      scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Give a rebuilt stage a fresh optimizer in place: drop all state, raise every learning rate.

    Each group's `lr` (and `initial_lr`) and the scheduler's base rates are multiplied by
    `lr_scale`, so a schedule keeps the raise for the rest of training. Hooks and the scheduler
    stay attached to the same object.
    """
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not (
            math.isfinite(lr_scale) and lr_scale > 0):
        raise CheckFreeError(f"lr_scale must be a positive, finite number, got {lr_scale!r}")
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = group[key].mul_(lr_scale) if torch.is_tensor(group[key]) else group[key] * lr_scale
    if scheduler is not None:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * lr_scale for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ---- checks -------------------------------------------------------------------------------------


def _check_stage(stage: int, num_stages: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise CheckFreeError(f"stage {stage} does not exist in a pipeline of {num_stages} stages")


def _norm(value: float, which: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckFreeError(f"the {which} stage's gradient norm must be a finite float >= 0, got {value!r}")
    return float(value)


def _entry_names(first: StateDict, second: StateDict, keys: Collection[str] | None, first_name: str,
                 second_name: str) -> list[str]:
    if keys is not None:
        names = list(keys)
        for state, which in ((first, first_name), (second, second_name)):
            absent = [k for k in names if k not in state]
            if absent:
                raise CheckFreeError(f"the {which} stage lacks entries of the lost stage: {_few(absent)}")
        return names
    if first.keys() != second.keys():
        only_first = sorted(set(first) - set(second))
        only_second = sorted(set(second) - set(first))
        raise CheckFreeError(f"neighbours' structures differ: only the {first_name} stage has {_few(only_first)}; "
                             f"only the {second_name} stage has {_few(only_second)} (pass keys= to rebuild a subset)")
    return list(first)


def _tensor(state: StateDict, name: str) -> torch.Tensor:
    value = state[name]
    if not isinstance(value, torch.Tensor):
        raise CheckFreeError(f"entry {name!r} is a {type(value).__name__}, not a tensor")
    return value


def _pair(first: StateDict, second: StateDict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _tensor(first, name), _tensor(second, name)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise CheckFreeError(f"entry {name!r} differs between the neighbours: {x.dtype}{list(x.shape)} vs "
                             f"{y.dtype}{list(y.shape)}")
    if x.device != y.device:
        raise CheckFreeError(f"entry {name!r} lies on {x.device} in one neighbour and {y.device} in the other")
    if x.layout is not torch.strided:
        raise CheckFreeError(f"entry {name!r}: {x.layout} tensors are not supported")
    return x, y


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
