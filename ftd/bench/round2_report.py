"""The second-round performance report: the newest results of the fixed-cost, restore, memory, EC, lag,
chaos and goodput benchmarks in bench/results, rendered as one markdown file (compare-<date>.md).

    python bench/report_round2.py [--results bench/results] [--out FILE]

Every figure is read from a results JSON (one run each); every ratio is against a reference measured in
that same run (memcpy, training without snapshots, torch.save, one transport stream). Each section states
its target and whether the figure meets it; the verdicts are computed here from the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftd.bench.common import Row
from ftd.bench.report import md_table

MIB = 1 << 20
GIB = 1 << 30
# The trainer's bounded staging: one copy slice (ftd.client.copier.COPY_SLICE_BYTES); the CPU path
# copies straight into the mapped segment and stages nothing else.
STAGING_BOUND_BYTES = 64 << 20
SEGMENT_SLACK = 0.01  # segments are rounded up and carry a header: 2x state within 1 %
Doc = dict[str, Any]


@dataclass
class Section:
    """One issue item: its heading, target sentence, verdict rows and any further tables or notes."""

    item: str
    title: str
    target: str
    rows: list[Row] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


# ---- inputs ------------------------------------------------------------------------------------


def newest(results: Path, prefix: str, accept: Callable[[Doc], bool] = lambda d: True) -> tuple[str, Doc] | None:
    """The newest `prefix`*.json (by name: names carry the date) whose document `accept`s."""
    for path in sorted(results.glob(f"{prefix}*.json"), reverse=True):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and accept(doc):
            return path.name, doc
    return None


def lag_runs(results: Path) -> dict[str, dict[str, tuple[str, Doc]]]:
    """config -> phase ('before' / 'after') -> the newest lag run of that label (before-3n-2+1, ...)."""
    out: dict[str, dict[str, tuple[str, Doc]]] = {}
    for path in sorted(results.glob("lag-*.json")):
        doc = json.loads(path.read_text())
        phase, _, config = (doc.get("options", {}).get("label") or "").partition("-")
        if phase in ("before", "after") and config:
            out.setdefault(config, {})[phase] = (path.name, doc)
    return out


def earlier_reports(results: Path, date: str) -> list[Path]:
    """The newest compare-*.md older than `date` (the first round's report), if any."""
    older = [p for p in sorted(results.glob("compare-*.md")) if _date(p.name) and _date(p.name) < date]
    return older[-1:]


def _date(name: str) -> str:
    m = re.search(r"\d{4}-\d{2}-\d{2}", name)
    return m.group(0) if m else ""


# ---- formatting ----------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _medians(runs: list[Doc]) -> Doc:
    """The median of each *_s figure over `runs` (as the restore bench summarises them)."""
    return {k: _med([r[k] for r in runs if k in r]) for k in runs[0] if k.endswith("_s")}


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def rows_table(rows: list[Row]) -> str:
    return md_table(["metric", "value", "target", "verdict"], [[r.metric, r.value, r.target, verdict(r.ok)]
                                                              for r in rows])


# ---- sections ------------------------------------------------------------------------------------


def fixed_cost(src: tuple[str, Doc]) -> Section:
    name, d = src
    s = Section("§1", "Fixed cost of a snapshot every step",
                "`snapshot()` ≤ 0.2 ms median; daemon CPU ≤ 1 ms per snapshot; trainer CPU ≤ 1 ms + the copy; "
                "loop overhead ≤ 5 % and no more than torch.save to /dev/shm in the same run", sources=[name])
    ret, t, dm = d["snapshot_return_ms"], d["trainer_cpu_ms_per_snapshot"], d["daemon_cpu_ms_per_snapshot"]
    it, ov = d["iteration_ms"], d["overhead_pct"]
    less_copy = t["total"] - t["copy_itself_median"]
    s.rows = [
        Row("`snapshot()` return, median (p90)", f"{ret['median']:.3f} ms ({ret['p90']:.3f})", "≤ 0.2 ms",
            ret["median"] <= 0.2),
        Row("trainer CPU per snapshot: training thread / copy thread",
            f"{t['training_thread']:.2f} / {t['copy_thread']:.2f} ms (the copy itself {t['copy_itself_median']:.2f} ms)"),
        Row("trainer CPU per snapshot, less the copy", f"{less_copy:.2f} ms", "≤ 1 ms + copy", less_copy <= 1.0),
        Row("daemon CPU per snapshot (less idle)", f"{dm['less_idle']:.2f} ms", "≤ 1 ms", dm["less_idle"] <= 1.0),
        Row("loop overhead, ftd every step", f"{ov['ftd']:+.1f} % ({it['ftd']['median']:.1f} vs "
            f"{it['none']['median']:.1f} ms per iteration)", "≤ 5 %", ov["ftd"] <= 5.0),
        Row("loop overhead, ftd vs torch.save to /dev/shm every step, same run",
            f"{ov['ftd']:+.1f} % vs {ov['torch_save']:+.1f} %", "ftd ≤ torch.save", ov["ftd"] <= ov["torch_save"]),
    ]
    a = d.get("args", {})
    s.body = [f"Demo GPT, {d['model_param_bytes'] / 1e6:.1f} MB of fp32 parameters ({d['last_bytes'] / MIB:.1f} MiB "
              f"per snapshot with AdamW, scheduler, RNG), dim {a.get('dim')}, {a.get('layers')} layers, "
              f"{d['snapshots']} snapshots, configurations interleaved in blocks of {a.get('block')} steps."]
    return s


def restore(src: tuple[str, Doc]) -> Section:
    name, d = src
    raw = d["raw"]
    s = Section("§2, §7", "Restore against memcpy, warm and in a fresh process",
                "a verified restore ≤ 2× a memcpy of the same bytes (§2); a fresh-process restore ≤ 2× memcpy + "
                "mapping (§7)", sources=[name])
    memcpy = _med(raw["memcpy_s"])
    warm, before = _medians(raw["warm"]), _medians(raw["warm_before"])
    cold = _medians(raw["cold"])
    cold_all = [c["total_s"] for c in raw["cold"]]
    alloc = _med([c["optimizer_alloc_touch_s"] for c in raw["cold"] if "optimizer_alloc_touch_s" in c] or [0.0])
    less_alloc = cold["total_s"] - cold.get("allocate_s", 0.0)
    bound = 2 * memcpy + cold.get("map_s", 0.0)
    exact = raw.get("warm_bit_exact") and all(c.get("bit_exact") for c in raw["cold"])
    s.rows = [
        Row(f"memcpy of the state ({raw['state_bytes'] / GIB:.2f} GiB) into touched buffers, median", _ms(memcpy)),
        Row("warm restore (verified), median", f"{_ms(warm['total_s'])} = {warm['total_s'] / memcpy:.2f}× memcpy",
            "≤ 2× memcpy", warm["total_s"] <= 2 * memcpy),
        Row("… split", f"verify {_ms(warm['verify_s'])}, load {_ms(warm['load_s'])}, map {_ms(warm['map_s'])}"),
        Row("… the previous restore path, same run", f"{_ms(before['total_s'])} = {before['total_s'] / memcpy:.2f}× memcpy"),
        Row("cold restore in a fresh process, median (min–max)",
            f"{_ms(cold['total_s'])} ({_ms(min(cold_all))}–{_ms(max(cold_all))}) = {cold['total_s'] / memcpy:.1f}× memcpy"),
        Row("… split", f"allocate {_ms(cold.get('allocate_s', 0.0))}, map {_ms(cold['map_s'])}, "
            f"verify {_ms(cold['verify_s'])}, load {_ms(cold['load_s'])}"),
        Row("fresh-process restore less the optimizer-state allocation (§7)", f"{_ms(less_alloc)} = {less_alloc / memcpy:.2f}× memcpy",
            f"≤ 2× memcpy + map = {_ms(bound)}", less_alloc <= bound),
        Row("fresh optimizer state alone: allocate + first touch of the same bytes", _ms(alloc)),
        Row("restored bytes identical (warm and cold)", "yes" if exact else "NO", "yes", bool(exact)),
    ]
    s.body = [f"Allocating the fresh optimizer's state (first touch of new pages) is "
              f"{cold.get('allocate_s', 0.0) / cold['total_s']:.0%} of the cold median; any restore into a fresh "
              "optimizer pays it."]
    return s


def rebuild(runs: dict[str, tuple[str, Doc]]) -> Section:
    s = Section("§3", "Rebuild of a lost node",
                "rebuild ≥ 0.5× one transport stream measured in the same run; the replacement's peak memory "
                "≤ 1.1× the node's data", sources=[n for n, _ in runs.values()])
    header, cols = ["metric"], []
    for transport, (_, d) in runs.items():
        rb, p, st = d["cluster"]["rebuild"], d["cluster"]["protection"], d["single_stream"]
        data = rb["node_data_bytes"]
        ratio = rb["node_data_gbps"] / st["gbps"]
        hwm = rb["vm_hwm"] / data
        s.rows += [
            Row(f"{transport}: rebuild vs one stream", f"{rb['rebuild_s']:.2f} s = {rb['node_data_gbps']:.2f} GB/s "
                f"vs {st['gbps']:.2f} GB/s = {ratio:.2f}×", "≥ 0.5×", ratio >= 0.5),
            Row(f"{transport}: replacement's VmHWM / node data", f"{hwm:.2f}× ({rb['peak_rss_anon'] / GIB:.3f} GiB "
                "private)", "≤ 1.1×", hwm <= 1.1),
        ]
        header.append(transport)
        cols.append([f"{d['args']['nodes']} nodes, EC {d['args']['ec']}, {d['gib_per_node']:g} GiB per node",
                     f"{rb['rebuild_s']:.2f} s", f"{rb['node_data_gbps']:.2f} GB/s", f"{st['gbps']:.2f} GB/s",
                     f"{ratio:.2f}×", f"{rb['cpu_s'] / (data / 1e9):.2f} core-s/GB",
                     f"{p['daemon_cpu_s'] / (p['protected_bytes'] / 1e9):.2f} core-s/GB",
                     f"{rb['vm_hwm'] / GIB:.2f} GiB = {hwm:.2f}×",
                     f"{rb['peak_rss_shmem'] / data:.2f}× / {rb['peak_rss_anon'] / GIB:.3f} GiB",
                     "yes" if rb["identical"] else "NO"])
    labels = ["setup", "rebuild (daemon's metrics)", "node data / rebuild time", "one stream, same run",
              "ratio", "CPU per GB rebuilt (all daemons)", "CPU per GB protected (all daemons)",
              "replacement's VmHWM / node data", "… shared peak / node data; private peak (RssAnon)", "rebuilt bytes identical"]
    s.body = [md_table(header, [[label] + [c[i] for c in cols] for i, label in enumerate(labels)]), "",
              "VmHWM counts the shared pages the replacement maps: its rebuilt segment and its parity, 1 + m/k of "
              "the node's data. While the node keeps its parity the ≤ 1.1× target cannot hold; the private peak is "
              "the rebuild's own working memory."]
    return s


def lag(runs: dict[str, dict[str, tuple[str, Doc]]], chaos: tuple[str, Doc] | None) -> Section:
    s = Section("§4", "Protection lag under fast steps",
                "lag ≤ one encode + one heartbeat (the bound each run measures: mean encode time + heartbeat)",
                sources=[n for phases in runs.values() for n, _ in phases.values()])
    table = []
    for config, phases in sorted(runs.items()):
        for phase in ("before", "after"):
            if phase not in phases:
                continue
            _, d = phases[phase]
            st, sec, g = d["lag_steps"], d["lag_s_from_steps"], d.get("lag_s_gauge")
            o = d["options"]
            table.append([f"{o['nodes']} nodes, EC {o['ec']}", phase, f"{d['step_period_s'] * 1e3:.0f} ms",
                          f"{st['median']:.0f} / {st['p90']:.0f}", f"{sec['median']:.2f} / {sec['p90']:.2f}",
                          f"{g['median']:.2f} / {g['p90']:.2f}" if g else "-", f"{d['bound_s']:.2f}"])
            if phase == "after":
                for q in ("median", "p90"):
                    s.rows.append(Row(f"{o['nodes']} nodes, EC {o['ec']}: lag {q}",
                                      f"{st[q]:.0f} steps = {sec[q]:.2f} s", f"≤ {d['bound_s']:.2f} s",
                                      sec[q] <= d["bound_s"]))
    s.body = [md_table(["cluster", "run", "step", "lag, steps (median / p90)", "lag, s from steps (median / p90)",
                        "lag, s from ftd_protection_lag_seconds", "bound s"], table)]
    if chaos:
        name, d = chaos
        st, sec = d["lag"]["steady"]["steps"], d["lag"]["steady"]["seconds"]
        o = d["options"]
        s.sources.append(name)
        s.body += ["", f"Chaos run ({name}: {o['nodes']} nodes, EC {o['ec']}, {len(d.get('kills', []))} kills, "
                   f"{d.get('recovered')} recovered): steady-state lag {st['median']:.0f} / {st['p90']:.0f} steps "
                   f"(median / p90), {sec['median']:.2f} / {sec['p90']:.2f} s."]
    return s


def goodput(src: tuple[str, Doc], results: Path) -> Section:
    name, d = src
    s = Section("§6", "Goodput model", "a plot of ftd's goodput against a dcp.async_save baseline at published "
                "whole-job MTBFs (no numeric target)", sources=[name])
    rows = d["rows"]
    above = sum(r["ftd_goodput"] >= r["baseline_goodput"] for r in rows)
    ov = d["inputs"]["sources"].get("ftd_overhead", {})
    def lost(r: Doc) -> str:
        h = r.get("ftd_hours_lost") or {}
        return " / ".join(f"{h.get(k, float('nan')):.2f}" for k in ("overhead", "lost_work", "recovery"))

    s.body = [md_table(["GPUs", "MTBF", "failures/day", "ftd", "dcp.async_save baseline", "ftd interval",
                        "baseline interval", "ftd h lost/day (overhead / lost work / recovery)"],
                       [[f"{r['gpus']:,}", f"{r['mtbf_h'] * 60:.0f} min", f"{r['failures_per_day']:.1f}",
                         f"{r['ftd_goodput']:.1%}", f"{r['baseline_goodput']:.1%}",
                         f"{r['ftd_interval_s']:.0f} s" if "ftd_interval_s" in r else "every step",
                         f"{r['baseline_interval_s']:.0f} s", lost(r)]
                        for r in rows]), "",
              f"ftd at or above the baseline at {above} of {len(rows)} sizes. Both snapshot at their Young/Daly "
              "interval for the cost of one save. ftd's cost per snapshot comes from a loop overhead of "
              f"{ov.get('value', float('nan')):.1%} of a step at a snapshot every step ({ov.get('source', '?')}), "
              "measured on a CPU-only machine where the copy competes with compute for the same cores; on a GPU "
              "the copy is a DMA beside the step."]
    png = results / Path(name).with_suffix(".png").name
    if png.exists():
        s.body += ["", f"![goodput]({png.name})"]
    return s


def first_snapshot(src: tuple[str, Doc]) -> Section:
    name, d = src
    s = Section("§7", "First snapshot of a fresh process against the steady state",
                "the first snapshot costs the loop no more than a steady one", sources=[name])
    table = []
    for variant, v in d["variants"].items():
        f, st = v["summary"]["first"], v["summary"]["steady"]
        cost_f, cost_s = f["return_s"] + f["iteration_slower_s"], st["return_s"] + st["iteration_slower_s"]
        table.append([variant, f"{f['stall_s']:.3f} / {st['stall_s']:.3f} s", f"{cost_f:+.3f} / {cost_s:+.3f} s",
                      f"{f['to_sealed_s']:.3f} / {st['to_sealed_s']:.3f} s"])
        if variant == "prepared":
            s.rows.append(Row("loop cost of the first vs a steady snapshot (return + slower iteration)",
                              f"{cost_f:.3f} vs {cost_s:.3f} s (stall {f['stall_s']:.3f} vs {st['stall_s']:.3f})",
                              "first ≤ steady", cost_f <= cost_s))
            s.rows.append(Row("first vs steady snapshot → sealed",
                              f"{f['to_sealed_s']:.3f} vs {st['to_sealed_s']:.3f} s"))
    s.body = [md_table(["variant", "stall, first / steady", "loop cost, first / steady", "to sealed, first / steady"],
                       table), "",
              "`prepared` is the default (size announced at construction, segments prepared ahead); `unannounced` "
              "is what a first snapshot cost before, `spare` the earlier keep + 1 segments policy. Loop cost = "
              "`snapshot()` return + how much longer the iteration took than one without a copy in flight "
              "(negative: within the noise of an iteration)."]
    return s


def memory(mem: tuple[str, Doc], ec: tuple[str, Doc] | None) -> Section:
    name, d = mem
    slack = f"+{SEGMENT_SLACK:.0%} for segment rounding"
    s = Section("§8", "Memory held while saving",
                f"≤ 2× state in shared memory (+ m/k parity with EC; {slack}); no trainer RAM growth beyond a "
                f"bounded staging buffer (taken as one copy slice, {STAGING_BOUND_BYTES // MIB} MiB)", sources=[name])
    table, anon = [], []
    for variant, v in d["variants"].items():
        m = v["summary"]
        anon.append(m["trainer_anon_growth_while_saving_bytes"])
        table.append([variant, str(m["segments"]), f"{m['shm_held_over_state']:.3f}×",
                      f"{m['trainer_anon_growth_while_saving_bytes'] / MIB:+.0f} MiB",
                      f"{m['trainer_shmem_growth_while_saving_bytes'] / MIB:+.0f} MiB",
                      f"{m['trainer_private_growth_while_saving_bytes'] / MIB:+.0f} MiB",
                      f"{m['trainer_rss_growth_while_saving_bytes'] / MIB:+.0f} MiB"])
    p = d["variants"]["prepared"]["summary"]
    shm = p["shm_held_over_state"]
    s.rows = [Row("shared memory held / state (default: prepared, keep 2)", f"{shm:.3f}× ({p['segments']} segments)",
                  f"≤ 2× ({slack})", shm <= 2 * (1 + SEGMENT_SLACK))]
    if ec:
        ename, e = ec
        s.sources.append(ename)
        k, m_ = e["k"], e["m"]
        par = max(v["parity_x"] for v in e["cluster"]["memory"].values())
        s.rows += [Row(f"parity held / snapshot, EC {k}+{m_}", f"{par:.3f}×", f"m/k = {m_ / k:.3f} ({slack})",
                       par <= m_ / k * (1 + SEGMENT_SLACK)),
                   Row("segments + parity with the defaults", f"{shm + par:.3f}×",
                       f"≤ 2 + m/k = {2 + m_ / k:.3f} ({slack})", shm + par <= (2 + m_ / k) * (1 + SEGMENT_SLACK))]
    own, mapped = p["trainer_anon_growth_while_saving_bytes"], p["trainer_shmem_growth_while_saving_bytes"]
    s.rows += [Row("trainer's own memory (RssAnon) growth while saving", f"{own / MIB:+.0f} MiB",
                   f"≤ {STAGING_BOUND_BYTES // MIB} MiB", own <= STAGING_BOUND_BYTES),
               Row("segment pages newly mapped by the trainer while saving (RssShmem growth)", f"{mapped / MIB:+.0f} MiB",
                   "0 (mapped ahead)", mapped <= 0)]
    s.body = [md_table(["variant", "segments", "shm / state", "trainer RssAnon growth", "RssShmem growth",
                        "Private_* growth", "RSS growth"], table), "",
              f"State {d['variants']['prepared']['state_bytes'] / GIB:.2f} GiB. Growth is the peak while saving minus "
              "the peak of an iteration without a copy (sampled every 50 ms). Private_* (smaps_rollup) also counts "
              "segment pages only the trainer maps. RssAnon growth spans "
              f"{min(anon) / MIB:+.0f} to {max(anon) / MIB:+.0f} MiB across the variants, which copy the same way: "
              "one run does not separate a staging buffer from the spread of an iteration's peak."]
    return s


# ---- the report ----------------------------------------------------------------------------------


def sections(results: Path) -> list[Section]:
    """Every section whose results are present, in the issue's order."""
    out: list[Section] = []
    fc, rs, mem = newest(results, "fixed-cost-"), newest(results, "restore-"), newest(results, "memory-")
    ec = {t: r for t in ("CurveZMQ", "plaintext")
          if (r := newest(results, "ec-", lambda d, t=t: d.get("single_stream", {}).get("transport") == t))}
    lags = lag_runs(results)
    chaos = newest(results, "chaos-", lambda d: "lag" in d)
    gp = newest(results, "goodput-")
    if fc:
        out.append(fixed_cost(fc))
    if rs:
        out.append(restore(rs))
    if ec:
        out.append(rebuild(ec))
    if lags:
        out.append(lag(lags, chaos))
    if gp:
        out.append(goodput(gp, results))
    if mem:
        out.append(first_snapshot(mem))
        out.append(memory(mem, ec.get("CurveZMQ") or ec.get("plaintext")))
    return out


def build(results: Path) -> tuple[str, str]:
    """(the newest input date, the markdown) of the report on `results`."""
    secs = sections(results)
    machine = next((json.loads((results / n).read_text()).get("machine") for s in secs for n in s.sources[:1]), {})
    dates = sorted({_date(n) for s in secs for n in s.sources} - {""})
    date = dates[-1] if dates else "undated"
    parts = [f"# ftd performance, second round — {date}", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
             f"{machine.get('ram_gib', 0):.1f} GiB RAM, torch {machine.get('torch', '?')}, device "
             f"{machine.get('device', '?')}. One run of each benchmark; every ratio is against a reference measured "
             "in the same run. The machine is shared and noisy: trust the ratios, not the third digit. Written by "
             "bench/report_round2.py from the results files named in each section."
             + "".join(f" Earlier report: [{p.name}]({p.name})." for p in earlier_reports(results, date)), "",
             "## Verdicts", "",
             md_table(["item", "metric", "value", "target", "verdict"],
                      [[s.item, r.metric, r.value, r.target, verdict(r.ok)] for s in secs for r in s.rows
                       if r.ok is not None])]
    for s in secs:
        parts += ["", f"## {s.item} {s.title}", "", f"Target: {s.target}. Source: "
                  + ", ".join(f"[{n}]({n})" for n in s.sources) + "."]
        if s.rows:
            parts += ["", rows_table(s.rows)]
        if s.body:
            parts += [""] + s.body
    return date, "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("bench/results"), help="where the results JSON are read")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown file to write (default: <results>/compare-<newest input date>.md)")
    a = ap.parse_args(argv)
    date, text = build(a.results)
    out = a.out or a.results / f"compare-{date}.md"
    out.write_text(text)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
