"""Arithmetic of the goodput model (ftd/bench/goodput.py)."""

import math

from ftd.bench import goodput as gp


def test_zero_failures_goodput_is_one_minus_overhead():
    inp = gp.Inputs(ftd_overhead=0.05)
    f = gp.ftd_losses(inp, math.inf)
    assert f["lost_work"] == 0.0 and f["recovery"] == 0.0
    assert gp.goodput(f) == 1.0 - 0.05


def test_young_daly_interval_minimises_baseline_loss():
    inp = gp.Inputs(base_stall_s=2.0)
    m = 3600.0
    tau = gp.young_daly_interval(m, inp.base_stall_s)
    best = gp.goodput(gp.baseline_losses(inp, m, tau))
    for k in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0):
        assert gp.goodput(gp.baseline_losses(inp, m, tau * k)) < best


def test_goodput_falls_as_mtbf_falls():
    inp = gp.Inputs()
    rows = [gp.row(inp, 1, h) for h in (8.0, 2.0, 0.25)]
    for a, b in zip(rows, rows[1:]):
        assert b["ftd_goodput"] < a["ftd_goodput"]
        assert b["baseline_goodput"] < a["baseline_goodput"]


def test_ftd_interval_minimises_ftd_loss_and_is_at_least_one_step():
    inp = gp.Inputs(ftd_overhead=0.05, step_s=0.5)
    m = 3600.0
    best_n = gp.ftd_interval_steps(inp, m)
    best = gp.goodput(gp.ftd_losses(inp, m, best_n))
    assert best_n > 1 and gp.goodput(gp.ftd_losses(inp, m)) == best
    for n in {1, max(1, best_n // 2), best_n - 1, best_n + 1, 2 * best_n} - {best_n}:
        assert gp.goodput(gp.ftd_losses(inp, m, n)) <= best
    free = gp.Inputs(ftd_overhead=0.0, ftd_stall_s=0.0, step_s=1.0)
    assert gp.ftd_interval_steps(free, m) == 1  # free snapshots: every step


def test_ftd_overhead_is_the_snapshot_cost_over_the_interval():
    inp = gp.Inputs(ftd_overhead=0.04, ftd_stall_s=0.01, step_s=2.0)
    f = gp.ftd_losses(inp, 3600.0, 10)
    assert math.isclose(f["overhead"], 0.04 * 2.0 / 20.0) and f["interval_s"] == 20.0
    stalled = gp.Inputs(ftd_overhead=0.0, ftd_stall_s=0.5, step_s=1.0)
    assert math.isclose(gp.ftd_losses(stalled, 3600.0, 5)["overhead"], 0.1)


def test_recoveries_come_from_the_newest_chaos_run_with_enough_kills(tmp_path):
    import json

    def run(name: str, kills: int, rank_s: float) -> None:
        (tmp_path / name).write_text(json.dumps({"kills": [{"kind": "rank", "recovery_s": rank_s}] * kills}))

    run("chaos-2026-01-01.json", 50, 4.0)
    run("chaos-2026-01-02.json", 50, 3.0)
    run("chaos-2026-01-03-short.json", 5, 1.0)  # newest by name, but too few kills
    inp = gp.Inputs()
    gp.load_results(inp, tmp_path)
    assert inp.ftd_recovery_rank_s == 3.0 and "chaos-2026-01-02.json" in inp.sources["ftd_recovery_rank_s"].source
