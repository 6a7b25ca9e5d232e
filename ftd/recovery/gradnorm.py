"""Per-stage gradient norms: the weights CheckFree gives a lost stage's two neighbours.

One line per stage process:

    tracker = GradNormTracker.attach(optimizer)      # or GradNormTracker(stage_module) + record()
    ...
    tracker.norm                                     # L2 norm of the last completed step's gradient

`attach` measures in a pre-hook of `optimizer.step`, so after backward, after the data-parallel
all-reduce and after any clipping done before the step; the value becomes `norm` in a post-hook
once the step has completed (a step that raises leaves `norm` alone). The norm is a plain Python
float, so it travels to neighbours as JSON (`report()`); replicas of a stage hold bit-equal
gradients after the all-reduce and therefore measure the same value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class GradNormTracker:
    """Measures the L2 norm of a stage's gradient (all its parameters together) once per step.

    Every gradient's norm is taken in float64 (`torch.linalg.vector_norm(..., dtype=float64)`),
    then the norm of those norms, so bf16/fp16 gradients neither overflow nor lose the sum.
    Parameters without a gradient are skipped; a stage with none measures 0.0.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor]):
        self.params: list[torch.Tensor] = list(params.parameters() if isinstance(params, nn.Module) else params)
        self.norm: float | None = None
        self.steps = 0
        self._pending: float | None = None
        self._hooks: list[RemovableHandle] = []

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer,
               params: nn.Module | Iterable[torch.Tensor] | None = None) -> GradNormTracker:
        """A tracker fed by hooks on `optimizer.step` (over the optimizer's parameters by default)."""
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        tracker = cls(params)
        tracker._hooks = [optimizer.register_step_pre_hook(tracker._before_step),
                          optimizer.register_step_post_hook(tracker._after_step)]
        return tracker

    def measure(self) -> float:
        """The norm of the gradients as they are now (no state changes)."""
        norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
                 for p in self.params if p.grad is not None]
        if not norms:
            return 0.0
        device = norms[0].device
        stacked = torch.stack([n.to(device) for n in norms])
        return float(torch.linalg.vector_norm(stacked).item())

    def record(self) -> float:
        """Measure and count a completed step; call it right before `optimizer.step()` when not attached."""
        self.norm = self.measure()
        self.steps += 1
        return self.norm

    def report(self) -> dict[str, Any]:
        """What a stage tells its neighbours: `{"steps": int, "grad_norm": float | None}` (JSON-safe).

        A non-finite norm is reported as None (JSON has no NaN), which a rebuild refuses.
        """
        norm = self.norm if self.norm is not None and math.isfinite(self.norm) else None
        return {"steps": self.steps, "grad_norm": norm}

    def close(self) -> None:
        """Remove the optimizer hooks (if attached)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> GradNormTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pending = self.measure()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending is not None:
            self.norm, self._pending = self._pending, None
            self.steps += 1
