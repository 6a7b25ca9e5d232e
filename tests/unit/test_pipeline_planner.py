"""The pipeline recovery planner's pure parts: what a stage stores beside its state, and which losses
CheckFree can rebuild."""

from __future__ import annotations

import torch

from ftd.recovery.gradnorm import GradNormTracker
from ftd.recovery.pipeline import GRAD_NORM_KEY, StageExtra, _why_not_rebuildable


def test_stage_extra_stores_the_norm_and_gives_back_user_values():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    tracker = GradNormTracker(layer)
    tracker.record()
    position = {"step": 7, "epoch": 1}
    extra = StageExtra(tracker, position)
    saved = extra()
    assert saved["step"] == 7 and saved[GRAD_NORM_KEY]["grad_norm"] == tracker.norm
    fresh = StageExtra(GradNormTracker(layer), {"step": 0})
    assert fresh.restored(saved) == tracker.norm
    assert fresh.user == {"step": 7, "epoch": 1} and fresh.tracker.norm == tracker.norm
    assert fresh.restored(None) is None and fresh.user == {"step": 7, "epoch": 1}


def test_stage_extra_refuses_the_reserved_key():
    extra = StageExtra(GradNormTracker([]), {GRAD_NORM_KEY: 1})
    try:
        extra()
    except ValueError as exc:
        assert GRAD_NORM_KEY in str(exc)
    else:
        raise AssertionError("the reserved key was accepted")


def test_which_losses_checkfree_can_rebuild():
    assert _why_not_rebuildable([1, 3], 5) is None
    assert _why_not_rebuildable([2], 5) is None
    assert "edge" in _why_not_rebuildable([0], 5)
    assert "edge" in _why_not_rebuildable([4], 5)
    assert "neighbour" in _why_not_rebuildable([1, 2], 5)
