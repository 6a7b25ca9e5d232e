"""Recovery of lost training state without a snapshot: CheckFree and CheckFree+ (docs/ARCHITECTURE.md §6).

    tracker = GradNormTracker.attach(optimizer)                       # every stage, once
    # stage i lost; its neighbours send state_dict() and tracker.norm
    state = rebuild_intermediate(prev_sd, next_sd, prev_norm, next_norm, keys=module.state_dict().keys())
    module.load_state_dict(state)
    restart_optimizer(optimizer, scheduler=scheduler)                 # fresh state, lr x 1.1

A pipeline job recovers through `restore_pipeline` (ftd.recovery.pipeline): memory first,
CheckFree for stages whose snapshots are gone.

Names are imported on first use: the daemon may import this package without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftd.recovery.checkfree import (
        DEFAULT_LR_SCALE,
        EPS,
        coefficients,
        edge_extras,
        edge_neighbour,
        neighbours,
        rebuild_edge,
        rebuild_intermediate,
        restart_optimizer,
    )
    from ftd.recovery.gradnorm import GradNormTracker
    from ftd.recovery.pipeline import StageExtra, restore_pipeline
    from ftd.recovery.schedule import SwapSchedule

_HOMES = {
    "DEFAULT_LR_SCALE": "checkfree", "EPS": "checkfree", "coefficients": "checkfree", "edge_extras": "checkfree",
    "edge_neighbour": "checkfree", "neighbours": "checkfree", "rebuild_edge": "checkfree",
    "rebuild_intermediate": "checkfree", "restart_optimizer": "checkfree",
    "GradNormTracker": "gradnorm", "SwapSchedule": "schedule", "StageExtra": "pipeline",
    "restore_pipeline": "pipeline",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ftd.recovery' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ftd.recovery.{home}"), name)


__all__ = sorted(_HOMES)
