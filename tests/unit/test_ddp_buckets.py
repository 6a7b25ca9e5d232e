"""ftd.client.ddp on a real one-rank gloo DDP: the rebuilt buckets are read, put back into a fresh
DDP, and anything it cannot use leaves DDP as it was (the 3- and 4-rank runs are in
tests/integration/test_ddp_ranks.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from ftd.client.ddp import BucketKeeper, find
from ftd.demo.model import TinyGPT, batch


@pytest.fixture
def group(tmp_path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ddp(seed: int = 0, **kwargs) -> torch.nn.parallel.DistributedDataParallel:
    torch.manual_seed(seed)
    # small buckets so the model spans several and their order matters, too
    return torch.nn.parallel.DistributedDataParallel(TinyGPT(dim=64, layers=2, context=32), bucket_cap_mb=0.1,
                                                     **kwargs)


def _backward(ddp: torch.nn.Module) -> None:
    x, _ = batch(0, 0, 2, 32, 0)
    ddp(x).sum().backward()


def _layout(ddp: torch.nn.parallel.DistributedDataParallel) -> list[list[int]]:
    index = {id(p): i for i, p in enumerate(ddp._build_params_for_reducer()[0])}
    return [[index[id(p)] for p in b.parameters()] for b in ddp.reducer._get_zeros_like_grad_buckets()]


def test_find_takes_the_wrapper_or_refuses_what_is_not_one():
    plain = TinyGPT(dim=8, layers=1, context=4)
    assert find(plain, None) is None
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        find(plain, plain)


def test_rebuilt_buckets_are_recorded_and_put_back_into_a_fresh_ddp(group):
    ddp = _ddp()
    keeper = BucketKeeper(ddp)
    initial = _layout(ddp)
    assert keeper.buckets() is None  # no backward yet: DDP still holds its initial buckets
    _backward(ddp)
    recorded = keeper.buckets()  # performs DDP's one rebuild (the next forward's)
    assert recorded is not None and ddp._has_rebuilt_buckets and len(recorded) > 1
    assert recorded == _layout(ddp) != initial
    assert sorted(i for b in recorded for i in b) == list(range(len(ddp._build_params_for_reducer()[0])))

    fresh = _ddp(1)
    assert _layout(fresh) == initial
    assert BucketKeeper(fresh).apply(recorded)
    assert _layout(fresh) == recorded and fresh._has_rebuilt_buckets
    _backward(fresh)  # the rebuilt reducer reduces, and DDP's own later rebuild keeps the layout
    _backward(fresh)
    assert _layout(fresh) == recorded
    assert all(p.grad is not None for p in fresh.parameters())


@pytest.mark.parametrize("recorded", [[[0, 0]], "buckets", [[1.5]], [], [[0, 1]]])
def test_recorded_buckets_it_cannot_use_leave_ddp_as_it_was(group, recorded, caplog):
    fresh = _ddp()
    initial = _layout(fresh)
    with caplog.at_level(logging.WARNING, logger="ftd.client.ddp"):
        assert not BucketKeeper(fresh).apply(recorded)
    assert _layout(fresh) == initial and not fresh._has_rebuilt_buckets
    _backward(fresh)  # DDP still works


def test_nothing_is_applied_over_buckets_ddp_already_rebuilt(group):
    ddp = _ddp()
    _backward(ddp)
    rebuilt = BucketKeeper(ddp).buckets()
    assert rebuilt is not None
    assert not BucketKeeper(ddp).apply(list(reversed(rebuilt)))
    assert _layout(ddp) == rebuilt


def test_find_unused_parameters_keeps_its_initial_buckets(group):
    ddp = _ddp(find_unused_parameters=True)
    keeper = BucketKeeper(ddp)
    _backward(ddp)
    assert keeper.buckets() is None and not ddp._has_rebuilt_buckets  # DDP never rebuilds them
