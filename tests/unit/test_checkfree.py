"""ftd.recovery: CheckFree rebuilds bit for bit, CheckFree+ edges and swap schedule, gradient norms, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ftd.errors import CheckFreeError, FtdError
from ftd.recovery import (
    DEFAULT_LR_SCALE,
    EPS,
    GradNormTracker,
    SwapSchedule,
    coefficients,
    edge_extras,
    edge_neighbour,
    neighbours,
    rebuild_edge,
    rebuild_intermediate,
    restart_optimizer,
)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors, a shared machine: one thread, and the global generator put back afterwards."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Block(nn.Module):
    """A stage's block with every kind of state-dict entry: float params, float/int/bool buffers, a 0-d one."""

    def __init__(self, dim: int = 6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lin = nn.Linear(dim, dim, dtype=dtype)
        self.norm = nn.BatchNorm1d(dim, dtype=dtype)
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))
        self.register_buffer("mask", torch.ones(dim, dtype=torch.bool))
        self.register_buffer("index", torch.arange(dim, dtype=torch.int32))


def _stage_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A randomised state dict of a Block (different per seed, also in its integer entries)."""
    g = _gen(seed)
    out = {}
    for name, t in Block(dtype=dtype).state_dict().items():
        if t.is_floating_point():
            out[name] = torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)
        elif t.dtype == torch.bool:
            out[name] = torch.rand(t.shape, generator=g) > 0.5
        else:
            out[name] = torch.randint(0, 100, t.shape, generator=g, dtype=t.dtype)
    return out


def _by_hand(prev: torch.Tensor, nxt: torch.Tensor, prev_norm: float, next_norm: float) -> torch.Tensor:
    """The documented arithmetic, one element at a time in Python floats (IEEE double, no fused ops)."""
    a, b = next_norm + 1e-4, prev_norm + 1e-4
    wa, wb = a / (a + b), b / (a + b)
    values = [x * wa + y * wb for x, y in zip(nxt.double().flatten().tolist(), prev.double().flatten().tolist())]
    return torch.tensor(values, dtype=torch.float64).reshape(prev.shape).to(prev.dtype)


# ---- the intermediate rebuild ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norms", [(0.37, 1.9), (2.5, 0.0), (0.0, 0.0), (1e-3, 40.0)])
def test_floating_entries_equal_the_formula_bitwise(dtype, norms):
    prev, nxt = _stage_state(1, dtype), _stage_state(2, dtype)
    rebuilt = rebuild_intermediate(prev, nxt, *norms)
    assert rebuilt.keys() == prev.keys()
    floating = [k for k, v in prev.items() if v.is_floating_point()]
    assert "scale" in floating and prev["scale"].dim() == 0  # a 0-d entry is among them
    assert "norm.running_mean" in floating  # and float buffers
    for name in floating:
        got = rebuilt[name]
        assert got.dtype == dtype and got.shape == prev[name].shape
        assert torch.equal(got, _by_hand(prev[name], nxt[name], *norms)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_it_is_the_weighted_average_of_the_paper(dtype):
    prev, nxt = _stage_state(3, dtype), _stage_state(4, dtype)
    p, n = 0.8, 3.1
    rebuilt = rebuild_intermediate(prev, nxt, p, n)
    a, b = n + EPS, p + EPS
    for name, t in prev.items():
        if t.is_floating_point():
            textbook = (a * nxt[name].double() + b * t.double()) / (a + b)
            scale = (a * nxt[name].double().abs() + b * t.double().abs()) / (a + b)  # cancellation-aware bound
            assert ((rebuilt[name].double() - textbook).abs() <= 4 * torch.finfo(dtype).eps * scale).all(), name


def test_the_heavier_neighbour_dominates():
    prev = {"w": torch.zeros(4)}
    nxt = {"w": torch.ones(4)}
    assert rebuild_intermediate(prev, nxt, 0.0, 1e6)["w"].min() > 0.999
    assert rebuild_intermediate(prev, nxt, 1e6, 0.0)["w"].max() < 0.001
    assert torch.equal(rebuild_intermediate(prev, nxt, 2.0, 2.0)["w"], torch.full((4,), 0.5))


def test_coefficients():
    wb, wa = coefficients(1.0, 3.0)
    assert (wb, wa) == ((1.0 + EPS) / (4.0 + 2 * EPS), (3.0 + EPS) / (4.0 + 2 * EPS))
    assert coefficients(0.0, 0.0) == (0.5, 0.5)


@pytest.mark.parametrize("heavier", ["prev", "next", "tie"])
def test_integer_and_bool_entries_come_from_the_heavier_neighbour(heavier):
    prev, nxt = _stage_state(5), _stage_state(6)
    norms = {"prev": (2.0, 1.0), "next": (1.0, 2.0), "tie": (1.5, 1.5)}[heavier]
    rebuilt = rebuild_intermediate(prev, nxt, *norms)
    source = nxt if heavier == "next" else prev
    for name in ("index", "mask", "norm.num_batches_tracked"):
        assert not torch.equal(prev[name], nxt[name]), name  # the test can tell the two apart
        assert rebuilt[name].dtype == prev[name].dtype
        assert torch.equal(rebuilt[name], source[name]), name


def test_complex_entries_are_averaged_in_complex128():
    g = _gen(7)
    prev = {"z": torch.randn(5, generator=g, dtype=torch.complex64)}
    nxt = {"z": torch.randn(5, generator=g, dtype=torch.complex64)}
    wb, wa = coefficients(0.5, 1.5)
    expected = (nxt["z"].to(torch.complex128) * wa + prev["z"].to(torch.complex128) * wb).to(torch.complex64)
    got = rebuild_intermediate(prev, nxt, 0.5, 1.5)["z"]
    assert got.dtype == torch.complex64 and torch.equal(got, expected)


def test_inputs_are_untouched_and_unshared():
    prev, nxt = _stage_state(8), _stage_state(9)
    before = {k: (v.clone(), nxt[k].clone()) for k, v in prev.items()}
    rebuilt = rebuild_intermediate(prev, nxt, 1.0, 1.0)
    for t in rebuilt.values():
        t.zero_() if t.dtype != torch.bool else t.fill_(False)
    for name, (p, n) in before.items():
        assert torch.equal(prev[name], p) and torch.equal(nxt[name], n), name


def test_rebuilt_state_loads_into_a_fresh_stage():
    prev, nxt = Block(), Block()
    with torch.no_grad():
        for p in [*prev.parameters(), *nxt.parameters()]:
            p.normal_(generator=_gen(p.numel()))
    lost = Block()
    lost.load_state_dict(rebuild_intermediate(prev.state_dict(), nxt.state_dict(), 0.5, 0.25))
    expected = _by_hand(prev.lin.weight.detach(), nxt.lin.weight.detach(), 0.5, 0.25)
    assert torch.equal(lost.lin.weight.detach(), expected)


def test_keys_select_the_lost_stage_entries_from_an_edge_neighbour():
    blocks = _stage_state(10)
    first = {"embed.weight": torch.randn(7, 6, generator=_gen(11)), **_stage_state(12)}
    rebuilt = rebuild_intermediate(first, blocks, 1.0, 2.0, keys=blocks.keys())
    assert rebuilt.keys() == blocks.keys()
    assert torch.equal(rebuilt["lin.weight"], _by_hand(first["lin.weight"], blocks["lin.weight"], 1.0, 2.0))


# ---- replicas -----------------------------------------------------------------------------------------


def test_replicas_compute_identical_rebuilds():
    """Each replica gets its own copy of the neighbours' tensors and the norms as JSON, as over a wire."""
    prev, nxt = _stage_state(13, torch.bfloat16), _stage_state(14, torch.bfloat16)
    norms = [0.1234567890123, 7.654321]
    results = []
    for _ in range(3):
        received = json.loads(json.dumps({"prev": norms[0], "next": norms[1]}))
        results.append(rebuild_intermediate({k: v.clone() for k, v in prev.items()},
                                            {k: v.clone() for k, v in nxt.items()},
                                            received["prev"], received["next"]))
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in prev)


def test_thread_count_does_not_change_the_bits():
    g = _gen(15)
    prev, nxt = {"w": torch.randn(300, 400, generator=g)}, {"w": torch.randn(300, 400, generator=g)}
    one = rebuild_intermediate(prev, nxt, 0.3, 0.9)["w"]
    torch.set_num_threads(2)
    two = rebuild_intermediate(prev, nxt, 0.3, 0.9)["w"]
    assert torch.equal(one, two)


# ---- errors -------------------------------------------------------------------------------------------


def test_error_is_an_ftd_error_and_a_value_error():
    assert issubclass(CheckFreeError, FtdError) and issubclass(CheckFreeError, ValueError)


def test_mismatched_keys():
    prev, nxt = _stage_state(16), _stage_state(17)
    del nxt["lin.bias"]
    nxt["other"] = torch.zeros(1)
    with pytest.raises(CheckFreeError, match=r"only the previous stage has 'lin.bias'.*only the next stage has 'oth"):
        rebuild_intermediate(prev, nxt, 1.0, 1.0)
    with pytest.raises(CheckFreeError, match="next stage lacks entries of the lost stage: 'lin.bias'"):
        rebuild_intermediate(prev, nxt, 1.0, 1.0, keys=prev.keys())


@pytest.mark.parametrize("change", ["shape", "dtype", "device", "not a tensor"])
def test_mismatched_entries(change):
    prev, nxt = _stage_state(18), _stage_state(19)
    w = nxt["lin.weight"]
    nxt["lin.weight"] = {"shape": w[:, :3], "dtype": w.double(), "device": w.to("meta"), "not a tensor": [1.0]}[change]
    with pytest.raises(CheckFreeError, match="lin.weight"):
        rebuild_intermediate(prev, nxt, 1.0, 1.0)


@pytest.mark.parametrize("norm", [-1.0, math.nan, math.inf, None, True, "1.0", torch.tensor(1.0)])
def test_bad_norms(norm):
    prev, nxt = _stage_state(20), _stage_state(21)
    with pytest.raises(CheckFreeError, match="gradient norm"):
        rebuild_intermediate(prev, nxt, norm, 1.0)
    with pytest.raises(CheckFreeError, match="gradient norm"):
        rebuild_intermediate(prev, nxt, 1.0, norm)


def test_stage_topology():
    assert neighbours(3, 6) == (2, 4)
    assert (edge_neighbour(0, 6), edge_neighbour(5, 6), edge_neighbour(0, 2), edge_neighbour(1, 2)) == (1, 4, 1, 0)
    for stage in (0, 5):
        with pytest.raises(CheckFreeError, match="edge stage"):
            neighbours(stage, 6)
    with pytest.raises(CheckFreeError, match="intermediate"):
        edge_neighbour(2, 6)
    with pytest.raises(CheckFreeError, match="no neighbour"):
        edge_neighbour(0, 1)
    for stage, n in ((6, 6), (-1, 6), (0, 0)):
        with pytest.raises(CheckFreeError, match="does not exist"):
            neighbours(stage, n)


# ---- CheckFree+: edges --------------------------------------------------------------------------------


def _first_stage_state(seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"embed.weight": torch.randn(7, 6, generator=g), **_stage_state(seed + 1)}


def test_edge_extras_are_copies_of_what_the_neighbour_lacks():
    first, second = _first_stage_state(22), _stage_state(24)
    kept = edge_extras(first, second)
    assert list(kept) == ["embed.weight"]
    assert torch.equal(kept["embed.weight"], first["embed.weight"])
    kept["embed.weight"].zero_()
    assert first["embed.weight"].abs().sum() > 0


def test_edge_rebuild_is_the_neighbour_plus_the_kept_copy():
    first, second = _first_stage_state(25), _stage_state(27)
    kept = edge_extras(first, second)
    rebuilt = rebuild_edge(second, kept)
    assert rebuilt.keys() == set(first)
    assert torch.equal(rebuilt["embed.weight"], first["embed.weight"])
    for name, t in second.items():
        assert torch.equal(rebuilt[name], t) and rebuilt[name].data_ptr() != t.data_ptr(), name


def test_edge_rebuild_of_a_two_stage_pipeline_selects_keys():
    first = _first_stage_state(28)
    last = {**_stage_state(30), "head.weight": torch.randn(7, 6, generator=_gen(31))}
    kept = edge_extras(last, first)
    assert list(kept) == ["head.weight"]
    rebuilt = rebuild_edge(first, kept, keys=last.keys())
    assert rebuilt.keys() == last.keys()
    assert torch.equal(rebuilt["lin.weight"], first["lin.weight"])
    with pytest.raises(CheckFreeError, match="overlap"):
        rebuild_edge(first, {"lin.weight": torch.zeros(6, 6)})


def test_edge_errors():
    first, second = _first_stage_state(32), _stage_state(34)
    with pytest.raises(CheckFreeError, match="neither the neighbour nor the kept copy holds 'embed.weight'"):
        rebuild_edge(second, {}, keys=first.keys())
    bad = dict(second, **{"lin.weight": torch.zeros(5, 6)})
    with pytest.raises(CheckFreeError, match="lin.weight"):
        edge_extras(first, bad)


# ---- CheckFree+: the swap schedule ---------------------------------------------------------------------


def test_swap_schedule_orders():
    s = SwapSchedule(6)
    assert [s.order(m) for m in range(4)] == [[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 5, 4]] * 2
    assert SwapSchedule(4).order(1) == [1, 0, 3, 2]
    assert SwapSchedule(5).order(3) == [1, 0, 2, 4, 3]


@pytest.mark.parametrize("n", [4, 5, 6, 9])
def test_swap_schedule_is_a_permutation_with_consistent_links(n):
    s = SwapSchedule(n)
    for m in range(6):
        order = s.order(m)
        assert sorted(order) == list(range(n))
        assert order[2:n - 2] == list(range(2, n - 2))  # the middle never moves
        for stage in range(n):
            assert order[s.position(stage, m)] == stage
            down = s.downstream(stage, m)
            assert down is None or s.upstream(down, m) == stage
        assert [st for st in range(n) if s.upstream(st, m) is None] == [order[0]]
        assert [st for st in range(n) if s.downstream(st, m) is None] == [order[-1]]
    firsts = [s.order(m)[0] for m in range(100)]
    assert firsts.count(1) == firsts.count(0) == 50


def test_swap_schedule_errors():
    for n in (1, 2, 3):
        with pytest.raises(CheckFreeError, match="at least 4 stages"):
            SwapSchedule(n)
    with pytest.raises(CheckFreeError, match="micro-batch"):
        SwapSchedule(4).order(-1)
    with pytest.raises(CheckFreeError, match="does not exist"):
        SwapSchedule(4).position(4, 0)


# ---- gradient norms -----------------------------------------------------------------------------------


def _tiny_model_step(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    """A real model with a real backward and active clipping; returns the pre-clip norm."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3), nn.LayerNorm(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 5, generator=_gen(seed)), torch.randn(16, 3, generator=_gen(seed + 1))
    nn.functional.mse_loss(model(x), y).backward()
    return model, opt, float(nn.utils.clip_grad_norm_(model.parameters(), 0.05))


def _hand_norm(model: nn.Module) -> float:
    return math.sqrt(math.fsum(v * v for p in model.parameters() for v in p.grad.double().flatten().tolist()))


def test_attached_tracker_reports_the_clipped_norm_after_the_step():
    model, opt, pre_clip = _tiny_model_step()
    tracker = GradNormTracker.attach(opt)
    assert tracker.norm is None and tracker.report() == {"steps": 0, "grad_norm": None}
    expected = _hand_norm(model)
    assert pre_clip > 0.1  # clipping was active, so the two norms differ
    opt.step()
    assert isinstance(tracker.norm, float) and tracker.steps == 1
    assert tracker.norm == pytest.approx(expected, rel=1e-12)
    assert tracker.norm == pytest.approx(0.05, rel=1e-4)
    report = json.loads(json.dumps(tracker.report()))
    assert report == {"steps": 1, "grad_norm": tracker.norm}


def test_manual_record_and_parameter_subsets():
    model, opt, _ = _tiny_model_step(1)
    whole, part = GradNormTracker(model), GradNormTracker(model[0].parameters())
    assert whole.record() == pytest.approx(_hand_norm(model), rel=1e-12)
    part_hand = math.sqrt(math.fsum(v * v for p in model[0].parameters() for v in p.grad.double().flatten().tolist()))
    assert part.record() == pytest.approx(part_hand, rel=1e-12)
    assert (whole.steps, part.steps) == (1, 1)


def test_a_failed_step_keeps_the_last_completed_norm():
    model, opt, _ = _tiny_model_step(2)
    with GradNormTracker.attach(opt) as tracker:
        opt.step()
        done = tracker.norm
        for p in model.parameters():
            p.grad.mul_(3.0)

        def broken() -> float:
            raise RuntimeError("step failed")

        with pytest.raises(RuntimeError):
            opt.step(broken)
        assert (tracker.norm, tracker.steps) == (done, 1)
        opt.step()
        assert tracker.norm == pytest.approx(3.0 * done, rel=1e-6) and tracker.steps == 2
    opt.step()  # closed: the hooks are gone
    assert tracker.steps == 2


def test_low_precision_gradients_and_no_gradients():
    model = nn.Linear(4, 4, dtype=torch.bfloat16)
    tracker = GradNormTracker(model)
    assert tracker.measure() == 0.0
    model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert tracker.measure() == pytest.approx(_hand_norm(model), rel=1e-12)


def test_non_finite_norm_is_reported_as_none():
    model = nn.Linear(2, 2)
    model.weight.grad = torch.full((2, 2), math.nan)
    tracker = GradNormTracker(model)
    assert math.isnan(tracker.record())
    assert json.dumps(tracker.report()) == '{"steps": 1, "grad_norm": null}'


# ---- the rebuilt stage's optimizer ---------------------------------------------------------------------


def test_restart_optimizer_drops_state_and_raises_the_learning_rate():
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    assert opt.state and opt.param_groups[0]["lr"] == pytest.approx(0.005)
    restart_optimizer(opt, scheduler=sched)
    assert not opt.state
    assert DEFAULT_LR_SCALE == 1.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0055)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.011)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    opt.step()
    assert int(opt.state[model.weight]["step"]) == 1  # Adam starts over
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.011 / 3)  # the schedule keeps the raise


def test_restart_optimizer_custom_scale_and_errors():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    restart_optimizer(opt, lr_scale=1.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)
    for bad in (0, -1.0, math.nan, math.inf, True, "2"):
        with pytest.raises(CheckFreeError, match="lr_scale"):
            restart_optimizer(opt, lr_scale=bad)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)
