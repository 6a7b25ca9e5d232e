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
