"""Global placements of captured entries (ftd.client.placement): across the replicas of a group, the pieces
written to the durable tier tile every global tensor exactly once, for plain copies spread over replicas and
for the row pieces of sharded replicated state."""

from __future__ import annotations

import math

import pytest
import torch

from ftd.client import placement, sharding, state
from ftd.client.sharding import Replicas
from ftd.durable.layout import Piece
from ftd.durable.writer import _overlap


def _captured(index: int, dp: int, shard: bool) -> state.Captured:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 12), torch.nn.Linear(12, 7), torch.nn.LayerNorm(7))
    opt = torch.optim.AdamW(model.parameters())
    model[1](model[0](torch.arange(5))).sum().backward()
    opt.step()
    cap = state.capture(3, model, opt, None, None)
    if shard:
        sharding.shard(cap, Replicas(dp, index), lambda name: name in cap.live)
    placement.assign(cap, Replicas(dp, index), lambda name: name.startswith(("model/", "optim/")))
    return cap


@pytest.mark.parametrize("dp, shard", [(1, False), (3, False), (2, True), (5, True)])
def test_written_pieces_tile_every_global_tensor_once(dp: int, shard: bool):
    written: dict[str, list[Piece]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for index in range(dp):
        cap = _captured(index, dp, shard)
        for spec in cap.specs:
            p = spec.placement
            if spec.name.startswith("rng/"):
                assert p is None
                continue
            assert p is not None, spec.name
            assert math.prod(p.box) == math.prod(spec.shape)
            shapes[p.fqn] = p.shape
            if p.write:
                written.setdefault(p.fqn, []).append(Piece(p.offsets, p.box, index, (0, 0)))
    assert set(written) == set(shapes) and any(f.startswith("optim.state.1.weight.") for f in shapes)
    for fqn, pieces in written.items():
        assert sum(math.prod(p.box) for p in pieces) == math.prod(shapes[fqn]), fqn
        assert not _overlap(pieces), fqn
    if dp > 1 and not shard:  # plain copies: each written by one replica, spread over all of them
        assert all(len(p) == 1 for p in written.values())
        assert len({p[0].rank for p in written.values()}) == dp


def test_names_follow_dcp_state_dict_helpers():
    model = torch.nn.Linear(3, 2)
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP's state_dict names look like
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    cap = state.capture(1, wrapped, opt, None, None)
    assert set(cap.fqns.values()) == {"model.weight", "model.bias", "optim.state.weight.momentum_buffer",
                                      "optim.state.bias.momentum_buffer"}
