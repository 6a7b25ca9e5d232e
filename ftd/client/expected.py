"""The bytes a rank's snapshot will take, estimated before its first step (what its Hello announces).

Model tensors (parameters and buffers, a DTensor's local shard) and the optimizer state that
already exists are counted as `ftd.manifest.layout` places them (each entry aligned). State an
optimizer creates only at its first step is estimated for the optimizers whose state is known,
for each trainable parameter without state: Adam and AdamW (exp_avg and exp_avg_sq like the
parameter, a scalar float32 step, max_exp_avg_sq with amsgrad) and SGD (momentum_buffer when
momentum is set). Any other optimizer holding trainable parameters without state gives None:
nothing is announced and the first snapshot prepares its own segments, as it always did.
RNG, scheduler, `extra` and metadata tensors are covered by MARGIN_BYTES; an estimate a little
short only costs the first snapshot its head start.
"""

from __future__ import annotations

import torch

from ftd.client.state import is_dtensor
from ftd.manifest import align_up

MARGIN_BYTES = 1 << 20
_ADAM = ("Adam", "AdamW")


def expected_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int | None:
    """Estimated snapshot size of `model` and `optimizer` (see the module docstring); None when unknown."""
    total = MARGIN_BYTES + sum(_laid_out(t) for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    if optimizer is None:
        return total
    for group in optimizer.param_groups:
        for param in group["params"]:
            have = optimizer.state.get(param)
            if have:
                total += sum(_laid_out(v) for v in have.values() if isinstance(v, torch.Tensor))
            elif param.requires_grad:
                extra = _fresh_state(optimizer, group, param)
                if extra is None:
                    return None
                total += extra
    return total


def _fresh_state(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> int | None:
    """Bytes of the state `optimizer` will create for `param` at its first step; None when unknown."""
    name = type(optimizer).__name__
    like = _laid_out(param)
    if name in _ADAM:
        return (3 if group.get("amsgrad") else 2) * like + align_up(4)
    if name == "SGD":
        return like if group.get("momentum") else 0
    return None


def _laid_out(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if is_dtensor(tensor) else tensor
    return align_up(local.numel() * local.element_size())
