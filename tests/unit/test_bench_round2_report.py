"""The second-round report renders from a results directory: its figures and met/missed verdicts come
from the JSON it finds there (a changed input flips its verdict), and it names the newest inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftd.bench import round2_report as r2

GIB = 1 << 30


def fixed_cost(snapshot_ms: float = 0.15, overhead: float = 4.0) -> dict[str, Any]:
    return {"model_param_bytes": 2_000_000, "last_bytes": 6 << 20, "snapshots": 60, "args": {"dim": 128, "layers": 2,
            "block": 20}, "machine": {"cpu": "TestCPU", "cores": 2, "ram_gib": 8.0, "torch": "x", "device": "cpu"},
            "snapshot_return_ms": {"median": snapshot_ms, "p90": snapshot_ms * 1.5},
            "trainer_cpu_ms_per_snapshot": {"training_thread": 0.3, "copy_thread": 2.0, "copy_itself_median": 1.5,
                                            "total": 2.3},
            "daemon_cpu_ms_per_snapshot": {"raw": 0.8, "less_idle": 0.8, "idle_ms_per_s": 0.0},
            "iteration_ms": {k: {"median": v, "p90": v} for k, v in (("none", 30.0), ("ftd", 31.2),
                                                                      ("torch_save", 70.0))},
            "overhead_pct": {"ftd": overhead, "torch_save": 133.0}}


def restore(warm_s: float = 0.15) -> dict[str, Any]:
    warm = {"total_s": warm_s, "map_s": 0.001, "verify_s": 0.05, "load_s": 0.05}
    cold = {"total_s": 0.9, "map_s": 0.07, "allocate_s": 0.6, "verify_s": 0.07, "load_s": 0.02, "bit_exact": True,
            "optimizer_alloc_touch_s": 1.0}
    return {"raw": {"state_bytes": GIB, "memcpy_s": [0.1, 0.1, 0.1], "warm": [warm] * 3, "warm_before": [warm] * 3,
                    "warm_bit_exact": True, "cold": [cold] * 3}}


def ec(transport: str, rebuild_gbps: float) -> dict[str, Any]:
    mem = {str(i): {"parity_x": 0.334} for i in range(4)}
    return {"args": {"nodes": 4, "ec": "3+1"}, "k": 3, "m": 1, "gib_per_node": 1.0,
            "single_stream": {"transport": transport, "gbps": 1.0},
            "cluster": {"memory": mem, "protection": {"daemon_cpu_s": 20.0, "protected_bytes": 4e9},
                        "rebuild": {"rebuild_s": 2.0, "node_data_bytes": GIB, "node_data_gbps": rebuild_gbps,
                                    "cpu_s": 8.0, "vm_hwm": int(1.05 * GIB), "peak_rss_anon": GIB // 10,
                                    "peak_rss_shmem": GIB, "identical": True}}}


def lag(label: str, median_steps: float) -> dict[str, Any]:
    q = {"median": median_steps, "p90": median_steps + 1, "max": median_steps + 5}
    return {"options": {"label": label, "nodes": 3, "ec": "2+1"}, "step_period_s": 0.03, "bound_s": 0.27,
            "lag_steps": q, "lag_s_from_steps": {k: v * 0.03 for k, v in q.items()}, "lag_s_gauge": None}


def memory(first_slower_s: float = 0.03) -> dict[str, Any]:
    def variant(first: float, shm: float) -> dict[str, Any]:
        shot = {"return_s": 0.001, "stall_s": 0.0, "to_sealed_s": 0.14}
        return {"state_bytes": GIB, "summary": {
            "first": {**shot, "iteration_slower_s": first}, "steady": {**shot, "iteration_slower_s": 0.05},
            "segments": 2, "shm_held_over_state": shm, "trainer_anon_growth_while_saving_bytes": 10 << 20,
            "trainer_shmem_growth_while_saving_bytes": 0, "trainer_private_growth_while_saving_bytes": 12 << 20,
            "trainer_rss_growth_while_saving_bytes": 1 << 20}}
    return {"variants": {"prepared": variant(first_slower_s, 2.001), "unannounced": variant(3.0, 2.0)}}


def goodput() -> dict[str, Any]:
    rows = [{"gpus": 1024, "mtbf_h": 7.9, "failures_per_day": 3.0, "ftd_goodput": 0.97, "baseline_goodput": 0.95,
             "baseline_interval_s": 160.0, "ftd_interval_s": 42.0, "ftd_hours_lost": {"overhead": 0.48, "lost_work": 0.024, "recovery": 0.0}}]
    return {"rows": rows, "inputs": {"sources": {"ftd_overhead": {"value": 0.02, "source": "x.json:loop"}}}}


def write_all(root: Path, override: dict[str, dict[str, Any]] | None = None) -> None:
    docs = {"fixed-cost-2026-01-02.json": fixed_cost(), "restore-2026-01-02.json": restore(),
            "memory-2026-01-02.json": memory(), "ec-2026-01-02-curve.json": ec("CurveZMQ", 0.6),
            "ec-2026-01-02-plain.json": ec("plaintext", 0.2), "lag-2026-01-02-before-3n.json": lag("before-3n", 20),
            "lag-2026-01-02-after-3n.json": lag("after-3n", 5), "goodput-2026-01-03.json": goodput()}
    docs.update(override or {})
    for name, doc in docs.items():
        (root / name).write_text(json.dumps(doc))


def verdicts(md: str) -> dict[str, str]:
    """metric -> verdict from the report's Verdicts table."""
    table = md.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("§"):
            out[f"{cells[0]} {cells[1]}"] = cells[4]
    return out


def find(v: dict[str, str], item: str, words: str) -> str:
    hits = [verdict for metric, verdict in v.items() if metric.startswith(item) and words in metric]
    assert len(hits) == 1, (item, words, sorted(v))
    return hits[0]


def test_figures_and_verdicts_come_from_the_inputs(tmp_path: Path) -> None:
    write_all(tmp_path)
    date, md = r2.build(tmp_path)
    assert date == "2026-01-03"
    assert md.startswith("# ftd performance, second round — 2026-01-03") and "TestCPU" in md
    v = verdicts(md)
    assert find(v, "§1", "`snapshot()` return") == "met"
    assert "0.150 ms (0.225)" in md
    assert find(v, "§1", "loop overhead, ftd every step") == "met"
    assert find(v, "§1", "daemon CPU") == "met"
    assert find(v, "§1", "less the copy") == "met"  # 2.3 - 1.5 = 0.8 ms
    assert find(v, "§2", "warm restore") == "met" and "150 ms = 1.50× memcpy" in md
    assert find(v, "§2", "less the optimizer-state allocation") == "**missed**"  # 300 ms > 2 x 100 + 70
    assert find(v, "§3", "CurveZMQ: rebuild") == "met" and "0.60×" in md
    assert find(v, "§3", "plaintext: rebuild") == "**missed**"
    assert find(v, "§3", "CurveZMQ: replacement's VmHWM") == "met"
    assert find(v, "§4", "lag median") == "met" and "5 steps = 0.15 s" in md
    assert find(v, "§7", "loop cost of the first") == "met"
    assert find(v, "§8", "shared memory held") == "met"
    assert find(v, "§8", "RssAnon") == "met"
    assert "| 97.0% | 95.0% |" in md and "at or above the baseline at 1 of 1 sizes" in md
    assert "| 42 s | 160 s | 0.48 / 0.02 / 0.00 |" in md  # ftd's interval, the baseline's, ftd's hours lost
    assert "![goodput]" not in md  # no PNG written next to the JSON
    (tmp_path / "goodput-2026-01-03.png").write_bytes(b"png")
    assert "![goodput](goodput-2026-01-03.png)" in r2.build(tmp_path)[1]


@pytest.mark.parametrize("override, item, words", [
    ({"fixed-cost-2026-01-02.json": fixed_cost(snapshot_ms=0.35)}, "§1", "`snapshot()` return"),
    ({"fixed-cost-2026-01-02.json": fixed_cost(overhead=6.5)}, "§1", "loop overhead, ftd every step"),
    ({"restore-2026-01-02.json": restore(warm_s=0.25)}, "§2", "warm restore"),
    ({"lag-2026-01-02-after-3n.json": lag("after-3n", 10)}, "§4", "lag median"),
    ({"memory-2026-01-02.json": memory(first_slower_s=0.2)}, "§7", "loop cost of the first"),
], ids=["snapshot", "overhead", "restore", "lag", "first-snapshot"])
def test_a_changed_input_flips_its_verdict(tmp_path: Path, override: dict[str, Any], item: str, words: str) -> None:
    write_all(tmp_path)
    assert find(verdicts(r2.build(tmp_path)[1]), item, words) == "met"
    write_all(tmp_path, override)
    assert find(verdicts(r2.build(tmp_path)[1]), item, words) == "**missed**"


def test_newest_file_wins_and_missing_benches_are_left_out(tmp_path: Path) -> None:
    (tmp_path / "fixed-cost-2026-01-01.json").write_text(json.dumps(fixed_cost(snapshot_ms=0.9)))
    (tmp_path / "fixed-cost-2026-01-05.json").write_text(json.dumps(fixed_cost(snapshot_ms=0.1)))
    date, md = r2.build(tmp_path)
    assert date == "2026-01-05" and "fixed-cost-2026-01-05.json" in md and "0.100 ms" in md
    assert "## §1" in md and "## §3" not in md and "## §8" not in md
    assert r2.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "compare-2026-01-05.md").read_text() == md
