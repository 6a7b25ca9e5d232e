"""A small GPT (token + position embeddings, pre-norm transformer blocks with dropout) for demos and tests."""

from __future__ import annotations

import math

import torch
from torch import nn


class TinyGPT(nn.Module):
    """Causal language model over a byte vocabulary."""

    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 32,
                 dropout: float = 0.1):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((context, context), float("-inf")), diagonal=1),
                             persistent=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.drop(self.tok(tokens) + self.pos[:t])
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay, as one LambdaLR."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch(step: int, rank: int, size: int, context: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic batch of (step, rank): byte sequences of a repeating pseudo-text."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    alphabet = torch.tensor(list(b"the quick brown fox jumps over the lazy dog "), dtype=torch.long)
    starts = torch.randint(0, len(alphabet), (size, 1), generator=g)
    idx = (starts + torch.arange(context + 1) * torch.randint(1, 4, (size, 1), generator=g)) % len(alphabet)
    seq = alphabet[idx]
    return seq[:, :-1], seq[:, 1:]
