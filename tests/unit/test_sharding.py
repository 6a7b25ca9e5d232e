"""Sharded snapshots of replicated state: the split, the layout in the manifest, the gather (its collective
played by threads), the restore, and the checks that refuse a snapshot taken with another replica layout."""

from __future__ import annotations

import math

import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftd
from ftd.client import gather, restore, sharding, state
from ftd.client.rpc import DaemonClient
from ftd.client.sharding import SPLIT, Layout, Replicas
from ftd.config import ClientConfig
from ftd.errors import SnapshotCorrupt
from ftd.manifest import EntrySpec, Manifest

JOB = "unit-shard"
WAIT_S = 30.0
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e5m2, torch.int64, torch.int8,
          torch.uint16, torch.bool, torch.complex64]


@pytest.fixture(autouse=True)
def _isolated_globals():
    """Snapshotter sets the 'ftd' log level and the tests draw from torch's RNG: undo both."""
    level, rng = logging.getLogger("ftd").level, torch.get_rng_state()
    try:
        yield
    finally:
        logging.getLogger("ftd").setLevel(level)
        torch.set_rng_state(rng)


# ---- the split ------------------------------------------------------------------------------------


def _spec(name: str, shape: tuple[int, ...], dtype: str = "float32") -> EntrySpec:
    return EntrySpec(name, "param", dtype, shape)


def _covered(layout: Layout, t: int) -> list[tuple[int, int]]:
    """The non-empty spans of tensor `t` over all replicas, in replica order."""
    return [span for i in range(layout.dp) if (span := layout.span(t, i))[1] > span[0]]


def test_piece_box_names_whole_rows_only():
    assert sharding.piece_box((10, 3), 6, 15) == ((2, 0), (3, 3))
    assert sharding.piece_box((10, 3), 5, 15) is None
    assert sharding.piece_box((), 0, 1) == ((), ())
    assert sharding.piece_box((7,), 2, 5) == ((2,), (3,))


@pytest.mark.parametrize("dp", [1, 2, 3, 7, 64])
def test_plan_covers_every_element_once_and_balances(dp):
    specs = [_spec("big", (1000, 37)), _spec("odd", (4099,), "float16"), _spec("bias", (37,)), _spec("step", ()),
             _spec("empty", (0, 4)), _spec("strided", (300, 300)), _spec("mid", (dp * 1024 + 1,)),
             _spec("bytes", (1001,), "int8"), _spec("c", (33,), "complex128")]
    contiguous = [True, True, True, True, True, False, True, True, True]
    layout = sharding.plan(specs, contiguous, dp, 0)
    owners = {t.name: t.owner for t in layout.tensors}
    assert owners["strided"] != SPLIT and all(o == SPLIT for n, o in owners.items() if n != "strided")
    for t, tensor in enumerate(layout.tensors):
        spans = _covered(layout, t)
        if tensor.owner == SPLIT:  # consecutive ranges over consecutive replicas, every element once
            assert (spans[0][0], spans[-1][1]) == (0, tensor.numel) if tensor.numel else spans == []
            assert all(hi == lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
            holders = [i for i in range(dp) if layout.piece_shape(t, i) is not None]
            assert holders == list(range(holders[0], holders[0] + len(holders))) if holders else tensor.numel == 0
        else:
            assert spans == [(0, tensor.numel)] and layout.piece_shape(t, tensor.owner) == tensor.shape
    shares = [layout.held_bytes(i) for i in range(dp)]
    assert sum(shares) == sum(s.nbytes for s in specs)
    stream = [layout.cuts[i + 1] - layout.cuts[i] for i in range(dp)]
    assert max(stream) - min(stream) <= 2 * 37 * 4  # even up to one row (of "big") at each cut
    for t, tensor in enumerate(layout.tensors):  # every piece is a box of whole rows (the durable tier's pieces)
        for i in range(dp):
            lo, hi = layout.span(t, i)
            if tensor.owner == SPLIT and hi > lo:
                offsets, box = sharding.piece_box(tensor.shape, lo, hi)
                assert (offsets[0] * math.prod(tensor.shape[1:]) if offsets else 0) == lo and math.prod(box) == hi - lo
    assert max(shares) - min(shares) <= 300 * 300 * 4  # at most the biggest tensor that went whole
    assert sharding.plan(specs, contiguous, dp, dp - 1).tensors == layout.tensors  # the same on every replica
    assert Layout.from_meta(layout.to_meta()) == layout


def test_cuts_fall_on_element_boundaries():
    layout = sharding.plan([_spec("a", (3,), "int8"), _spec("b", (10,), "float64"), _spec("c", (1,), "int8")],
                           [True, True, True], 3, 0)
    assert layout.stream_bytes == 84 and layout.cuts == (0, 27, 51, 84)  # 28 -> 27 and 56 -> 51: inside b
    assert [layout.span(1, i) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [layout.piece_shape(0, i) for i in range(3)] == [(3,), None, None]
    assert [layout.piece_shape(2, i) for i in range(3)] == [None, None, (1,)]
    assert list(layout.stream_tensors(1)) == [1]


def test_layout_meta_round_trips_and_malformed_meta_is_refused():
    layout = sharding.plan([_spec("a", (5000,)), _spec("b", (3,), "int64")], [True, True], 2, 1)
    again = Layout.from_meta(layout.to_meta())
    assert again == layout
    assert again.digest() == sharding.plan([_spec("a", (5000,)), _spec("b", (3,), "int64")], [True, True], 2,
                                           0).digest()  # the index is not part of the digest
    assert again.digest() != sharding.plan([_spec("a", (5000,))], [True], 2, 1).digest()
    good = layout.to_meta()
    for bad in [{}, {**good, "index": 2}, {**good, "tensors": {"a": ["float33", [1], 0]}},
                {**good, "tensors": {**good["tensors"], "a": ["float32", [-1], -1]}},
                {**good, "tensors": {**good["tensors"], "b": ["int64", [3], 5]}},
                {**good, "dp": True}, {**good, "tensors": {"a": "x"}}, {**good, "cuts": [0, 20024]},
                {**good, "cuts": [0, 10001, 20024]},  # not on an element boundary
                {**good, "cuts": [0, 30000, 20024]}, {**good, "cuts": [0, 10000, 20000]}]:
        with pytest.raises(SnapshotCorrupt, match="sharding layout"):
            Layout.from_meta(bad)


def _captured(tensors: dict[str, torch.Tensor]) -> state.Captured:
    cap = state.Captured(1)
    for name, t in tensors.items():
        cap.add(name, "param", t, live=True)
    cap.add("rng/torch", "rng", torch.get_rng_state())
    return cap


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        for shape in [(61, 67 + i), (5,), (), (0, 3)]:
            raw = torch.randint(0, 256, (torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(),),
                                dtype=torch.uint8, generator=gen)
            value = raw.view(dtype).reshape(shape) if dtype is not torch.bool else (raw % 2).bool().reshape(shape)
            out[f"model/{dtype}-{len(shape)}-{shape[0] if shape else 0}"] = value
    base = torch.randn(80, 90, generator=gen)
    out["model/transposed"] = base.t()  # non-contiguous: whole to one replica
    return out


def test_shard_keeps_live_views_and_records_the_layout():
    tensors = _random_tensors(0)
    cap = _captured(tensors)
    layout = sharding.shard(cap, Replicas(3, 2), lambda name: name in cap.live)
    assert cap.meta["sharding"] == layout.to_meta() and layout.index == 2
    by_name = dict(zip((s.name for s in cap.specs), cap.sources))
    assert "rng/torch" in by_name  # per-rank state is untouched
    for k, t in enumerate(layout.tensors):
        shape = layout.piece_shape(k, 2)
        if shape is None:
            assert t.name not in by_name
            continue
        src = by_name[t.name]
        assert tuple(src.shape) == shape
        if t.owner == SPLIT:  # a view of the live tensor: the copy thread reads it after snapshot() returned
            live = tensors[t.name]
            lo = layout.span(k, 2)[0]
            assert src.data_ptr() == live.data_ptr() + lo * live.element_size()
    assert layout.tensors[-1].name == "model/transposed" and layout.tensors[-1].owner != SPLIT
    held = sum(s.nbytes for s in cap.specs if s.kind == "param")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total / 3 * 0.8 < held < total / 3 * 1.2


class _ThreadGroup:
    """An all-gather among `dp` threads, standing in for torch.distributed's over a replica group."""

    def __init__(self, dp: int):
        self.barrier = threading.Barrier(dp, timeout=WAIT_S)
        self.sends: list[torch.Tensor | None] = [None] * dp
        self.calls = 0

    def member(self, index: int):
        def all_gather(rows: torch.Tensor, send: torch.Tensor) -> None:
            self.sends[index] = send.clone()
            self.barrier.wait()
            rows.copy_(torch.cat(self.sends))  # type: ignore[arg-type]
            self.calls += index == 0
            self.barrier.wait()
        return all_gather


def _gather_in_threads(layouts: list[Layout], raws: list, intos: list | None = None
                       ) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Run gather.gather on every replica at once, each in its own thread; return the results and the rounds."""
    group, results = _ThreadGroup(len(layouts)), [None] * len(layouts)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = gather.gather(layouts[i], raws[i], Replicas(len(layouts), i), intos[i] if intos else None,
                                       group.member(i))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(layouts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors, errors
    assert all(r is not None for r in results)
    return results, group.calls  # type: ignore[return-value]


@pytest.mark.parametrize("dp", [2, 3])
@pytest.mark.parametrize("round_bytes", [192, 32 << 20], ids=["many-rounds", "one-round"])
def test_gather_reassembles_every_byte(monkeypatch, dp, round_bytes):
    monkeypatch.setitem(gather.GATHER_BYTES, "cpu", round_bytes)
    monkeypatch.setattr(gather, "MIN_ROUND_PIECE", 64)
    tensors = _random_tensors(1)
    caps = [_captured(tensors) for _ in range(dp)]
    layouts = [sharding.shard(cap, Replicas(dp, i), lambda name: name.startswith("model/"))
               for i, cap in enumerate(caps)]
    raws = [{s.name: src.contiguous().reshape(-1).view(torch.uint8)
             for s, src in zip(cap.specs, cap.sources)}.__getitem__ for cap in caps]
    results, rounds = _gather_in_threads(layouts, raws)
    assert (rounds > 10) == (round_bytes == 192)
    for full in results:
        assert full.keys() == tensors.keys()
        for name, want in tensors.items():
            got = full[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)), name


# ---- through a real daemon: the manifest, the checks, the restore ---------------------------------


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 8))
    model.register_parameter("unused_empty", nn.Parameter(torch.zeros(0, 4)))  # a zero-element parameter
    model.register_parameter("scalar", nn.Parameter(torch.tensor(seed + 0.5)))
    return model


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad(set_to_none=True)
        out = model(torch.randn(16, 48, generator=gen)) + model.scalar
        F.mse_loss(out, torch.randn(16, 8, generator=gen)).backward()
        opt.step()


def _snapshot(socket_path: str, rank: int, replicas: Replicas, step: int = 3
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Rank `rank` of a 2-rank job (replica `replicas.index`) trains `step` steps and snapshots."""
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with ftd.Snapshotter(model, opt, rank=rank, world_size=2, job=JOB, socket=socket_path) as snap:
        snap.replicas = replicas
        _train(model, opt, range(step))
        snap.snapshot(step)
        assert snap.wait(WAIT_S) and snap.stats.last_sealed_step == step, dict(snap.stats.skip_reasons)
    return model, opt


def _open(socket_path: str, rank: int, model: nn.Module, replicas: Replicas | None, step: int = 3):
    client = DaemonClient(socket_path, JOB, rank, 5.0)
    try:
        return restore.open_verified(client, JOB, rank, 2, step, model, replicas=replicas)
    finally:
        client.close()


@pytest.mark.parametrize("warm", [False, True], ids=["fresh-optimizer", "optimizer-with-state"])
def test_each_replica_stores_its_share_and_a_gather_restores_bit_exact(socket_path, warm):
    model, opt = _snapshot(socket_path, 0, Replicas(2, 0))
    _snapshot(socket_path, 1, Replicas(2, 1))
    fresh = _model(1)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    if warm:  # the gather then writes straight into the live parameters and optimizer state
        _train(fresh, opt2, range(7, 8))
    opened = [_open(socket_path, r, fresh, Replicas(2, r)) for r in range(2)]
    try:
        held = [sum(e.nbytes for e in o.manifest.entries if e.kind in ("param", "optim")) for o in opened]
        full = sum(t.numel * torch.empty((), dtype=getattr(torch, t.dtype)).element_size()
                   for t in opened[0].layout.tensors)
        assert sum(held) == full and max(held) < 0.6 * full, (held, full)
        names = {t.name for t in opened[0].layout.tensors}
        assert {f"model/{n}" for n, _ in model.named_parameters()} <= names
        assert any(n.startswith("optim/state/") for n in names)
        assert all(o.manifest.meta["sharding"]["dp"] == 2 for o in opened)
        assert opened[0].layout.digest() == opened[1].layout.digest()

        into = state.live_tensors(opened[0].manifest, fresh, opt2)
        model_names = {f"model/{n}" for n in fresh.state_dict()}
        assert set(into) == (names if warm else model_names)  # optimizer state only where it exists
        # replica 1 assembles into a throwaway model; replica 0 into `fresh`, in place
        other = _model(2)
        (gathered, _), _ = _gather_in_threads([o.layout for o in opened], [o.raw for o in opened],
                                              [into, state.live_tensors(opened[1].manifest, other, None)])
        assert all(gathered[n] is t for n, t in into.items())
        state.apply(opened[0].manifest, lambda n: gathered[n] if n in gathered else opened[0].view(n), fresh, opt2,
                    None, None, restore_rng=False)
    finally:
        for o in opened:
            o.close()
    _train(model, opt, range(3, 5))
    _train(fresh, opt2, range(3, 5))
    for (name, want), got in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def test_a_snapshot_of_another_replica_layout_is_refused(socket_path):
    model, _ = _snapshot(socket_path, 1, Replicas(2, 1))
    with pytest.raises(SnapshotCorrupt, match="dp=2 replicas; this job's replica group has 3"):
        _open(socket_path, 1, model, Replicas(3, 1))
    with pytest.raises(SnapshotCorrupt, match="holds replica 1's shard; this rank is replica 0"):
        _open(socket_path, 1, model, Replicas(2, 0))
    with pytest.raises(SnapshotCorrupt, match="sharded over 2 replicas but this Snapshotter does not shard"):
        _open(socket_path, 1, model, None)
    _open(socket_path, 1, model, Replicas(2, 1)).close()


def test_a_wrong_replica_count_falls_back_like_any_unusable_step(socket_path, caplog):
    model, _ = _snapshot(socket_path, 0, Replicas(2, 0))
    fresh = _model(1)
    with ftd.Snapshotter(fresh, torch.optim.AdamW(fresh.parameters()), rank=0, world_size=2, job=JOB,
                         socket=socket_path) as snap:
        snap.replicas = Replicas(3, 0)
        with caplog.at_level(logging.ERROR, logger="ftd.client.restore"):
            assert snap.restore() == 0
    assert "sharded over dp=2 replicas; this job's replica group has 3" in caplog.text
    assert not torch.equal(fresh[0].weight, model[0].weight)  # untouched


def test_manifest_entries_that_contradict_the_layout_are_refused():
    specs = [_spec("model/w", (4096,)), _spec("model/b", (4,)), _spec("model/t", (3, 3))]
    layout = sharding.plan(specs, [True, True, False], 2, 0)
    assert layout.cuts == (0, 8200, 16400)  # w[:2050] | w[2050:] + b; t (non-contiguous) whole to replica 0
    assert [t.owner for t in layout.tensors] == [SPLIT, SPLIT, 0]

    def manifest(index: int, entries: list[tuple[str, tuple[int, ...]]]) -> Manifest:
        from ftd.manifest import layout as place

        placed, total = place([_spec(n, s) for n, s in entries])
        meta = {"sharding": sharding.plan(specs, [True, True, False], 2, index).to_meta()}
        return Manifest(job=JOB, rank=index, world_size=2, step=1, chunk_bytes=4096, data_bytes=total,
                        entries=tuple(placed), meta=meta)

    assert sharding.check(manifest(0, [("model/w", (2050,)), ("model/t", (3, 3))]), Replicas(2, 0)) == layout
    sharding.check(manifest(1, [("model/w", (2046,)), ("model/b", (4,))]), Replicas(2, 1))
    with pytest.raises(SnapshotCorrupt, match=r"expects float32\[2050\], the snapshot has float32\[2049\]"):
        sharding.check(manifest(0, [("model/w", (2049,)), ("model/t", (3, 3))]), Replicas(2, 0))
    with pytest.raises(SnapshotCorrupt, match="'model/b'.*no entry"):
        sharding.check(manifest(1, [("model/w", (2046,))]), Replicas(2, 1))
    with pytest.raises(SnapshotCorrupt, match="'model/b'.*assigns it to other replicas"):
        sharding.check(manifest(0, [("model/w", (2050,)), ("model/b", (4,)), ("model/t", (3, 3))]), Replicas(2, 0))


def test_shard_replicated_setting():
    assert ClientConfig.load(environ={"FTD_SHARD_REPLICATED": "1"}).shard_replicated is True
    assert ClientConfig.load(environ={}).shard_replicated is False
    assert ClientConfig.load(environ={}, shard_replicated=True).shard_replicated is True
