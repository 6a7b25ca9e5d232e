"""Snapshot -> restore through a real in-process daemon: every byte, optimizer, scheduler and RNG comes back."""

from __future__ import annotations

import functools
import logging
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.bitexact import byte_view, same_bytes
from torch import nn

from tests.unit import snapkit


JOB = "unit-rt"
WAIT_S = 30.0

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
          torch.complex128, torch.uint16, torch.uint32, torch.uint64]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_globals():
    """These tests reseed every generator, pin threads, and Snapshotter sets the 'ftd' log level: undo it all."""
    threads = torch.get_num_threads()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    level = logging.getLogger("ftd").level
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        logging.getLogger("ftd").setLevel(level)


_snapshotter = functools.partial(snapkit.snapshotter, job=JOB)
_snap = snapkit.snap




def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, subnormals, -0.0 included); booleans only 0/1."""
    n = 1
    for d in shape:
        n *= d
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).clone()


# ---- every dtype and shape, byte for byte -----------------------------------------------------


class _AllDtypes(nn.Module):
    def __init__(self, seed: int | None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed or 0)

        def make(dtype, shape):
            return _random(dtype, shape, gen) if seed is not None else torch.zeros(shape, dtype=dtype)

        for i, dtype in enumerate(DTYPES):
            name = str(dtype).removeprefix("torch.")
            shape = (3, 5 + i)
            if dtype.is_floating_point or dtype.is_complex:
                self.register_parameter(f"p_{name}", nn.Parameter(make(dtype, shape), requires_grad=False))
            else:
                self.register_buffer(f"b_{name}", make(dtype, shape))
            self.register_buffer(f"scalar_{name}", make(dtype, ()))
            self.register_buffer(f"empty_{name}", make(dtype, (0, 4)))
        self.register_buffer("big", make(torch.float32, (70000,)))  # several checksum chunks


def test_every_dtype_round_trips_byte_exact(socket_path):
    model = _AllDtypes(seed=7)
    gen = torch.Generator().manual_seed(3)
    base = _random(torch.float64, (6, 9), gen)
    cbase = _random(torch.complex64, (4, 6), gen)
    extra = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "complex_t": cbase.t(),
        "neg_stride_like": torch.flip(base, dims=[0])[:, ::4],
        "expanded": torch.arange(3, dtype=torch.int16).expand(4, 3),
        "f8_strided": _random(torch.float8_e5m2, (8, 8), gen)[1::2, ::3],
        "zero_dim": torch.tensor(-0.0, dtype=torch.float64),
        "empty": torch.empty(0, 5, dtype=torch.int32),
        "meta": {"epoch": 3, "name": "run", (1, 2): [1.5, None]},
    }
    assert not extra["transposed"].is_contiguous() and not extra["strided"].is_contiguous()
    with _snapshotter(socket_path, model, extra=extra) as snap:
        _snap(snap, 5)

    fresh = _AllDtypes(seed=None)
    restored_extra = {"stale": 1}
    with _snapshotter(socket_path, fresh, extra=restored_extra) as snap:
        assert snap.restore() == 5
        assert snap.stats.restored_step == 5

    expected_sd, got_sd = model.state_dict(), fresh.state_dict()
    assert list(got_sd) == list(expected_sd)
    for name, want in expected_sd.items():
        assert same_bytes(got_sd[name], want), name
    assert any(not torch.equal(byte_view(t), torch.zeros_like(byte_view(t))) for t in got_sd.values())

    assert set(restored_extra) == set(extra)  # replaced in place, stale key gone
    for key, want in extra.items():
        if isinstance(want, torch.Tensor):
            assert same_bytes(restored_extra[key], want), key
    assert restored_extra["meta"] == extra["meta"]
    assert restored_extra["zero_dim"].dim() == 0
    assert str(restored_extra["zero_dim"].item()) == "-0.0"


def test_restored_tensors_are_independent_of_the_segment(socket_path):
    model = nn.Linear(3, 2)
    extra = {"t": torch.arange(4.0)}
    with _snapshotter(socket_path, model, extra=extra) as snap:
        _snap(snap, 1)
    restored: dict = {}
    with _snapshotter(socket_path, nn.Linear(3, 2), extra=restored) as snap:
        assert snap.restore() == 1
    restored["t"].add_(1)  # writable, and not a read-only view of the shared segment
    assert torch.equal(restored["t"], torch.arange(4.0) + 1)


# ---- optimizers -------------------------------------------------------------------------------


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train_step(model, optimizer, step: int, scheduler=None) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    optimizer.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95)),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
}


def _state_tensors(optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in optimizer.state_dict()["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"{pid}/{key}"] = value
    return out


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_resumes_bitwise(socket_path, kind):
    steps, after = 3, 2
    model = _mlp(0)
    opt = OPTIMIZERS[kind](model.parameters())
    with _snapshotter(socket_path, model, opt) as snap:
        for step in range(steps):
            _train_step(model, opt, step)
            snap.snapshot(step + 1)
        assert snap.wait(WAIT_S)
        assert snap.stats.last_sealed_step == steps, dict(snap.stats.skip_reasons)
        for step in range(steps, steps + after):  # the uninterrupted run
            _train_step(model, opt, step)

    resumed = _mlp(1)
    opt2 = OPTIMIZERS[kind](resumed.parameters())
    assert not torch.equal(resumed[0].weight, model[0].weight)
    with _snapshotter(socket_path, resumed, opt2) as snap:
        assert snap.restore() == steps
        for step in range(steps, steps + after):
            _train_step(resumed, opt2, step)

    for (name, want), got in zip(model.named_parameters(), resumed.parameters()):
        assert same_bytes(got, want), name
    want_state, got_state = _state_tensors(opt), _state_tensors(opt2)
    assert want_state and set(got_state) == set(want_state)
    for key, want in want_state.items():
        assert same_bytes(got_state[key], want), key
    g1, g2 = opt.state_dict()["param_groups"], opt2.state_dict()["param_groups"]
    assert g1 == g2


# ---- schedulers -------------------------------------------------------------------------------


def _sequential(opt):
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=20, pct_start=0.25)


@pytest.mark.parametrize("make_sched", [_sequential, _one_cycle], ids=["sequential", "onecycle"])
def test_scheduler_resumes(socket_path, make_sched):
    steps, after = 5, 6
    model = _mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    with _snapshotter(socket_path, model, opt, scheduler=sched) as snap:
        for step in range(steps):
            _train_step(model, opt, step, sched)
            snap.snapshot(step + 1)
        assert snap.wait(WAIT_S)
        assert snap.stats.last_sealed_step == steps
        lr_at_snapshot = sched.get_last_lr()
        lrs = []
        for step in range(steps, steps + after):
            _train_step(model, opt, step, sched)
            lrs.append((sched.get_last_lr(), [g.get("momentum") for g in opt.param_groups]))

    resumed = _mlp(1)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    sched2 = make_sched(opt2)
    assert sched2.get_last_lr() != lr_at_snapshot
    with _snapshotter(socket_path, resumed, opt2, scheduler=sched2) as snap:
        assert snap.restore() == steps
        assert sched2.get_last_lr() == lr_at_snapshot
        assert sched2.last_epoch == steps
        lrs2 = []
        for step in range(steps, steps + after):
            _train_step(resumed, opt2, step, sched2)
            lrs2.append((sched2.get_last_lr(), [g.get("momentum") for g in opt2.param_groups]))
    assert lrs2 == lrs
    for want, got in zip(model.parameters(), resumed.parameters()):
        assert same_bytes(got, want)


# ---- RNG --------------------------------------------------------------------------------------


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), np.random.rand(4).tolist(), np.random.randint(0, 1 << 30, 3).tolist(),
            torch.rand(5), torch.randn(2, 3), torch.randint(0, 100, (6,)))


def _assert_same_draws(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    for x, y in zip(a[4:], b[4:]):
        assert torch.equal(x, y)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_rng_streams_continue_after_restore(socket_path):
    _seed_all(11)
    model = nn.Linear(4, 4)
    _draws()  # some history, including numpy's cached gaussian state
    np.random.standard_normal()
    with _snapshotter(socket_path, model) as snap:
        _snap(snap, 2)
    expected = _draws()

    _seed_all(99)
    other = _draws()
    assert other[0] != expected[0]
    with _snapshotter(socket_path, nn.Linear(4, 4)) as snap:
        assert snap.restore() == 2
    _assert_same_draws(_draws(), expected)


def test_restore_rng_can_be_deferred(socket_path):
    _seed_all(5)
    with _snapshotter(socket_path, nn.Linear(2, 2)) as snap:
        _snap(snap, 1)
    expected = _draws()

    _seed_all(6)
    before = random.getstate()
    with _snapshotter(socket_path, nn.Linear(2, 2)) as snap:
        assert snap.restore(restore_rng=False) == 1
        assert random.getstate() == before  # left alone
        snap.restore_rng()
    _assert_same_draws(_draws(), expected)


# ---- extra ------------------------------------------------------------------------------------


def test_extra_restored_in_place_and_callable_extra(socket_path):
    counter = {"calls": 0}

    def state():
        counter["calls"] += 1
        return {"epoch": 4, "order": [3, 1, 2], "pos": (7, 8), "w": torch.full((2,), 0.5)}

    with _snapshotter(socket_path, nn.Linear(2, 2), extra=state) as snap:
        _snap(snap, 9)
    assert counter["calls"] == 1

    target = {"epoch": 0, "old": True}
    alias = target
    with _snapshotter(socket_path, nn.Linear(2, 2), extra=target) as snap:
        assert snap.restore() == 9
        restored = snap.restored_extra
    assert alias is target
    assert set(target) == {"epoch", "order", "pos", "w"}
    assert target["epoch"] == 4 and target["order"] == [3, 1, 2] and target["pos"] == (7, 8)
    assert torch.equal(target["w"], torch.full((2,), 0.5))
    assert restored is not None and restored["epoch"] == 4


def test_non_json_safe_extra_skips_snapshot_without_raising(socket_path):
    extra = {"ok": 1, "bad": object()}
    with _snapshotter(socket_path, nn.Linear(2, 2), extra=extra) as snap:
        snap.snapshot(1)  # must not raise into the training loop
        assert snap.wait(WAIT_S)
        assert snap.stats.requested == 1
        assert snap.stats.skipped == 1 and snap.stats.sealed == 0
        assert snap.stats.skip_reasons["capture"] == 1
        assert snap.client.list_steps() == []
        del extra["bad"]  # fixed: the next snapshot goes through
        _snap(snap, 2)
        assert snap.client.list_steps() == [2]


def test_extra_keys_with_slashes_snapshot(socket_path):
    extra = {"loss/train": torch.zeros(2), "loss": {"train": torch.ones(2)}}
    with _snapshotter(socket_path, nn.Linear(2, 2), extra=extra) as snap:
        snap.snapshot(1)
        assert snap.wait(WAIT_S)
        assert snap.stats.sealed == 1, dict(snap.stats.skip_reasons)
