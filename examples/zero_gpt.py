"""The DDP GPT of ddp_gpt.py with a sharded optimizer (ZeroRedundancyOptimizer): each rank holds,
and snapshots, only its partition of the AdamW state. Nothing else changes for ftd.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node=2 --max-restarts=3 \\
        examples/zero_gpt.py --steps 200
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from ddp_gpt import main


def make_sharded_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=lr)


if __name__ == "__main__":
    main(make_sharded_optimizer)
