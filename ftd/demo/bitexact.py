"""Bit-exact comparison of tensors: byte views, not values (`torch.equal` calls -0.0 and +0.0 equal, NaN unequal)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, flat, as uint8."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(byte_view(a), byte_view(b))


def differing(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are missing or differ in bytes (extra names in `got` included)."""
    names = sorted(set(got) | set(want))
    return [n for n in names if n not in got or n not in want or not same_bytes(got[n], want[n])]
