"""Goodput model: the fraction of wall time that is useful training progress, ftd against a disk
checkpoint baseline (`dcp.async_save`), at cluster sizes with published whole-job MTBFs.

Per failure-free hour a system loses its loop overhead; per failure it loses the work since the last
recoverable state plus the recovery time. With whole-job MTBF M (seconds):

    goodput = 1 - overhead - (lost_work + recovery) / M

ftd snapshots every n steps, n chosen like the baseline's interval (Young/Daly with the cost of one
snapshot, the measured per-step loop overhead times the step time, or the stall if larger; at least
every step): the overhead is that cost over the interval; a rank crash loses half an interval and
restores from local memory; a node loss loses half an interval plus the protection lag (work beyond
the last erasure-coded snapshot) and is rebuilt from peers; a fraction of failures exceeds the EC
redundancy and falls back to the durable tier (costed like the baseline). The baseline
checkpoints every tau = sqrt(2 M C) (Young/Daly) with C its stall per save; a failure loses tau/2 plus
the time a save takes to complete, and pays restart + load.

Published whole-job MTBFs (Llama 3-scale training and large-cluster failure studies): 7.9 h at 1k GPUs,
1.8 h at 16k GPUs, ~14 min at 131k GPUs.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# cluster size -> published whole-job MTBF in hours
PUBLISHED_MTBF_H: dict[int, float] = {1024: 7.9, 16384: 1.8, 131072: 14 / 60}
MTBF_SOURCE = "published (Llama 3-scale training / large-cluster failure studies)"


@dataclass
class Input:
    """One model input: its value, unit and where it came from (file + field, or 'assumption')."""
    name: str
    value: float
    unit: str
    source: str


@dataclass
class Inputs:
    """Everything the model needs, in seconds or fractions."""
    step_s: float = 1.0                  # training step time (assumption)
    ftd_overhead: float = 0.067          # fraction of step time ftd's loop overhead
    ftd_stall_s: float = 0.0             # per-step stall of snapshot()
    ftd_lag_s: float = 0.18              # protection lag: work lost on a node loss
    ftd_recovery_rank_s: float = 8.6
    ftd_recovery_node_s: float = 10.8
    ftd_recovery_daemon_s: float = 0.9
    base_stall_s: float = 0.36           # dcp.async_save stall per save
    base_done_s: float = 1.8             # save to complete
    base_load_s: float = 0.8             # load of the checkpoint
    restart_s: float = 8.6               # process restart + rendezvous (assumption)
    mix_node: float = 0.8                # failure-kind mix (assumption)
    mix_rank: float = 0.2
    beyond_ec: float = 0.01              # fraction of failures beyond EC redundancy (assumption)
    sources: dict[str, Input] = field(default_factory=dict)

    def set(self, name: str, value: float, unit: str, source: str) -> None:
        setattr(self, name, float(value))
        self.sources[name] = Input(name, float(value), unit, source)


def young_daly_interval(mtbf_s: float, cost_s: float) -> float:
    """Checkpoint interval that minimises cost/tau + tau/(2 MTBF): sqrt(2 MTBF C)."""
    return math.sqrt(2.0 * mtbf_s * max(cost_s, 1e-9))


def baseline_losses(inp: Inputs, mtbf_s: float, interval_s: float | None = None) -> dict[str, float]:
    """The baseline's lost fractions of wall time: overhead, lost work, recovery (and interval)."""
    tau = young_daly_interval(mtbf_s, inp.base_stall_s) if interval_s is None else interval_s
    lost = tau / 2.0 + inp.base_done_s
    return {"interval_s": tau, "overhead": inp.base_stall_s / tau, "lost_work": lost / mtbf_s,
            "recovery": (inp.restart_s + inp.base_load_s) / mtbf_s}


def ftd_snapshot_cost_s(inp: Inputs) -> float:
    """Loop time one ftd snapshot costs: the per-step overhead measured at a snapshot every step, or the stall."""
    return max(inp.ftd_overhead * inp.step_s, inp.ftd_stall_s)


def ftd_interval_steps(inp: Inputs, mtbf_s: float) -> int:
    """Whole steps between ftd snapshots that lose the least (Young/Daly rounded either way, at least 1)."""
    if math.isinf(mtbf_s):
        return 1
    tau = young_daly_interval(mtbf_s, ftd_snapshot_cost_s(inp)) / inp.step_s
    candidates = {max(1, math.floor(tau)), max(1, math.ceil(tau))}
    return max(candidates, key=lambda n: goodput(ftd_losses(inp, mtbf_s, n)))


def ftd_losses(inp: Inputs, mtbf_s: float, every: int | None = None) -> dict[str, float]:
    """ftd's lost fractions of wall time with a snapshot `every` steps (None: the best interval)."""
    if every is None:
        every = ftd_interval_steps(inp, mtbf_s)
    interval = every * inp.step_s
    overhead = ftd_snapshot_cost_s(inp) / interval
    if math.isinf(mtbf_s):
        return {"overhead": overhead, "lost_work": 0.0, "recovery": 0.0, "interval_s": interval}
    total = inp.mix_node + inp.mix_rank
    node, rank = inp.mix_node / total, inp.mix_rank / total
    inside = 1.0 - inp.beyond_ec
    lost = inside * (node * (inp.ftd_lag_s + interval / 2.0) + rank * interval / 2.0)
    rec = inside * (node * inp.ftd_recovery_node_s + rank * inp.ftd_recovery_rank_s)
    # beyond EC: the durable tier, costed like the baseline at its own Young/Daly interval
    b = baseline_losses(inp, mtbf_s)
    lost += inp.beyond_ec * (b["interval_s"] / 2.0 + inp.base_done_s)
    rec += inp.beyond_ec * (inp.restart_s + inp.base_load_s)
    return {"overhead": overhead, "lost_work": lost / mtbf_s, "recovery": rec / mtbf_s, "interval_s": interval}


def goodput(losses: dict[str, float]) -> float:
    """1 - the sum of the lost fractions, floored at 0."""
    return max(0.0, 1.0 - losses["overhead"] - losses["lost_work"] - losses["recovery"])


def row(inp: Inputs, gpus: int, mtbf_h: float) -> dict[str, Any]:
    """One table row: failures/day, goodput and hours lost/day by component for both systems."""
    m = mtbf_h * 3600.0
    f, b = ftd_losses(inp, m), baseline_losses(inp, m)
    hours = lambda d: {k: 24.0 * d[k] for k in ("overhead", "lost_work", "recovery")}  # noqa: E731
    return {"gpus": gpus, "mtbf_h": mtbf_h, "failures_per_day": 24.0 / mtbf_h,
            "ftd_goodput": goodput(f), "baseline_goodput": goodput(b),
            "baseline_interval_s": b["interval_s"], "ftd_interval_s": f["interval_s"], "ftd_hours_lost": hours(f), "baseline_hours_lost": hours(b)}


# ---- inputs from bench/results -----------------------------------------------------------------


def newest(results: Path, prefix: str) -> Path | None:
    """The newest results file starting with `prefix` (by name: names carry the date)."""
    files = sorted(glob.glob(str(results / f"{prefix}*.json")))
    return Path(files[-1]) if files else None


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def load_results(inp: Inputs, results: Path) -> None:
    """Fill `inp` from the newest results files; missing files/fields keep the stated defaults."""
    def take(name: str, unit: str, prefix: str, dotted: str, f=lambda v: v) -> None:
        path = newest(results, prefix)
        v = _get(json.loads(path.read_text()), dotted) if path else None
        if v is None:
            inp.sources[name] = Input(name, getattr(inp, name), unit,
                                      f"assumption (default; {prefix}*.json:{dotted} not found)")
        else:
            inp.set(name, f(v), unit, f"{path.name}:{dotted}")

    for name in ("step_s", "restart_s", "mix_node", "mix_rank", "beyond_ec"):
        inp.sources.setdefault(name, Input(name, getattr(inp, name), "s" if name.endswith("_s") else "fraction",
                                           "assumption"))
    take("ftd_overhead", "fraction", "compare-", "loop.configs",
         lambda cs: next((max(0.0, c["overhead_pct"]) / 100 for c in cs if c.get("method") == "ftd"), None)
         or 0.0)
    take("ftd_stall_s", "s", "snapshot-", "raw.stall_compute_s", _median)
    take("ftd_lag_s", "s", "lag-", "lag_s_from_steps.median")
    chaos, kills = chaos_run(results)
    for kind in ("rank", "node", "daemon"):
        name = f"ftd_recovery_{kind}_s"
        xs = [k["recovery_s"] for k in kills or [] if k.get("kind") == kind and k.get("recovery_s") is not None]
        if xs:
            inp.set(name, _median(xs), "s", f"{chaos.name}:kills[kind={kind}].recovery_s median")
        else:
            inp.sources[name] = Input(name, getattr(inp, name), "s", "assumption (default; no chaos kills)")


CHAOS_MIN_KILLS = 20  # a chaos run with fewer kills gives no recovery medians to the model


def chaos_run(results: Path, min_kills: int = CHAOS_MIN_KILLS) -> tuple[Path | None, list[Any] | None]:
    """The newest chaos run with at least `min_kills` kills (a short run's medians say little), and its kills."""
    for path in sorted(glob.glob(str(results / "chaos-*.json")), reverse=True):
        try:
            kills = _get(json.loads(Path(path).read_text()), "kills")
        except (OSError, ValueError):
            continue
        if isinstance(kills, list) and len(kills) >= min_kills:
            return Path(path), kills
    return None, None


def load_lag(inp: Inputs, results: Path, lag_file: str | None) -> None:
    """Prefer a named lag file (e.g. lag-2026-12-04-after-3n-2+1.json) when present."""
    path = results / lag_file if lag_file else None
    if path and path.exists():
        v = _get(json.loads(path.read_text()), "lag_s_from_steps.median")
        if v is not None:
            inp.set("ftd_lag_s", v, "s", f"{path.name}:lag_s_from_steps.median")


# ---- output ------------------------------------------------------------------------------------


def markdown(inp: Inputs, rows: list[dict[str, Any]], sens: list[dict[str, Any]], notes: list[str]) -> str:
    """The inputs table, the goodput table, the sensitivity line and the assumptions."""
    out = ["## Inputs", "", "| input | value | unit | source |", "|---|---|---|---|"]
    for s in inp.sources.values():
        out.append(f"| {s.name} | {s.value:.4g} | {s.unit} | {s.source} |")
    out += ["", f"MTBFs: {MTBF_SOURCE}.", "", "## Goodput", "",
            "| GPUs | MTBF | failures/day | ftd goodput | baseline goodput | ftd h lost/day (overhead / lost work / "
            "recovery) | baseline h lost/day (overhead / lost work / recovery) | ftd interval | baseline interval |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fh, bh = r["ftd_hours_lost"], r["baseline_hours_lost"]
        out.append(f"| {r['gpus']:,} | {r['mtbf_h'] * 60:.0f} min | {r['failures_per_day']:.1f} | "
                   f"{r['ftd_goodput']:.2%} | {r['baseline_goodput']:.2%} | "
                   f"{sum(fh.values()):.2f} ({fh['overhead']:.2f} / {fh['lost_work']:.3f} / {fh['recovery']:.3f}) | "
                   f"{sum(bh.values()):.2f} ({bh['overhead']:.3f} / {bh['lost_work']:.3f} / {bh['recovery']:.3f}) | "
                   f"{r['ftd_interval_s']:.0f} s | {r['baseline_interval_s']:.0f} s |")
    out += ["", "Sensitivity (MTBF x0.5 / x2): " + "; ".join(
        f"{s['gpus']:,} GPUs ftd {s['ftd_lo']:.2%}/{s['ftd_hi']:.2%}, baseline {s['base_lo']:.2%}/{s['base_hi']:.2%}"
        for s in sens), "", "## Assumptions", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """goodput vs GPUs, log x, both systems."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    g = [r["gpus"] for r in rows]
    ax.plot(g, [r["ftd_goodput"] for r in rows], "o-", label="ftd, Young/Daly interval")
    ax.plot(g, [r["baseline_goodput"] for r in rows], "s-", label="dcp.async_save, Young/Daly interval")
    ax.set_xscale("log")
    ax.set_xlabel("GPUs (published whole-job MTBF)")
    ax.set_ylabel("goodput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(inp: Inputs) -> dict[str, Any]:
    d = asdict(inp)
    d["sources"] = {k: asdict(v) for k, v in inp.sources.items()}
    return d
