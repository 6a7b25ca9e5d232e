"""The comparison's markdown report and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftd.bench.common import fmt_size

HOW_TO_READ = (
    "**How to read this.** Every method saves the same state (fp32 parameters of a few large "
    "nn.Linear layers plus AdamW's exp_avg and exp_avg_sq) in the same run on the same machine. "
    "*Stall* is the time the training loop is blocked per save: for synchronous saves the whole save; "
    "for dcp.async_save / torchsnapshot the call (it stages a copy) plus any wait for the previous save "
    "before the next one; for ftd the `snapshot()` call plus the wait in `optimizer.step()`'s pre-hook "
    "for the copy to finish. *With compute* puts a simulated forward/backward (matmuls on the same "
    "cores) between saves; *none* saves and steps back to back (ftd's worst case: the stall is the whole "
    "copy). *Done* is from the call until the save is complete (file written, fsynced for disk; future "
    "resolved; ftd segment sealed). *Restore* loads the newest save into a fresh model/optimizer. "
    "The ratio columns are peer / ftd: above 1 means ftd is faster by that factor. Absolute times depend "
    "on this machine (see the header); the ratios are the claim. memcpy is the physical floor "
    "of copying the bytes once, not a checkpointing method.")


def ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def spread(s: dict[str, float] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{ms(s['median'])} [{ms(s['min'])}–{ms(s['max'])}]"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return "-"
    return f"{a / b:.1f}x" if a / b < 100 else f"{a / b:.0f}x"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def med(r: dict[str, Any], key: str) -> float | None:
    s = r.get(key)
    return s["median"] if s and s.get("n") else None


def ratio_table(doc: dict[str, Any]) -> str:
    rows = []
    for size in doc["sizes"]:
        f = size["methods"].get("ftd", {})
        if "error" in f or not f:
            continue
        for key, r in size["methods"].items():
            if key == "ftd":
                continue
            if "error" in r:
                rows.append([fmt_size(size["requested_bytes"]), r["label"], r["error"], "", "", ""])
                continue
            rows.append([fmt_size(size["requested_bytes"]), r["label"],
                         ratio(med(r, "stall_compute"), med(f, "stall_compute")),
                         ratio(med(r, "stall_nocompute"), med(f, "stall_nocompute")),
                         ratio(med(r, "done"), med(f, "done")), ratio(med(r, "restore"), med(f, "restore"))])
    return md_table(["size", "peer", "stall, with compute (peer/ftd)", "stall, none (peer/ftd)",
                     "until complete (peer/ftd)", "restore (peer/ftd)"], rows)


def size_table(size: dict[str, Any]) -> str:
    rows = []
    for key, r in size["methods"].items():
        if "error" in r:
            rows.append([r["label"], r["error"]] + [""] * 6)
            continue
        rss = f"+{r['peak_rss_over_base'] / 2**20:.0f}"
        if "daemon_peak_rss" in r:
            rss += f" (daemon {r['daemon_peak_rss'] / 2**20:.0f})"
        rows.append([r["label"], spread(r.get("stall_compute")), spread(r.get("stall_nocompute")),
                     spread(r.get("done")), spread(r.get("restore")), r.get("restore_where", "-"), rss,
                     f"{r['bytes_written'] / 2**20:.0f}"])
    return md_table(["method", "stall w/ compute ms", "stall, none ms", "until complete ms", "restore ms",
                     "restore in", "peak RSS MiB over base", "MiB written"], rows)


def loop_table(loop: dict[str, Any]) -> str:
    rows = []
    for c in loop["configs"]:
        if "error" in c:
            rows.append([c["label"], c["error"], "", ""])
            continue
        rows.append([c["label"], spread(c["step"]), f"{c.get('overhead_pct', 0):+.1f} %",
                     ms(max(c["ftd_stalls_s"])) if c.get("ftd_stalls_s") else "-"])
    return md_table(["configuration", "step ms median [min–max]", "vs no checkpoints", "ftd max stall ms"], rows)


def scaling_table(sc: dict[str, Any]) -> str:
    rows = []
    for c in sc["clusters"]:
        if "skipped" in c or "error" in c:
            rows.append([str(c["nodes"]), "-", c.get("skipped") or c.get("error"), "", ""])
            continue
        rows.append([str(c["nodes"]), c["ec"], f"{c['sealed_s']:.2f}", f"{c['protected_after_seal_s']:.2f}",
                     f"{c['rebuild_s']:.2f} / {c['rebuild_end_to_end_s']:.2f}"])
    return md_table(["nodes", "EC", "seal all nodes s", "last seal -> protected everywhere s",
                     "rebuild of one node s (daemon / start->List)"], rows)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    a = doc["args"]
    parts = [f"# ftd vs what users pick today — {doc['when']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, torch {m['torch']} "
             f"({m['torch_threads']} threads), device {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, "
             f"Python {m['python']}, ftd {m['ftd']}. Repeats {a['repeats']} (median [min–max]); simulated "
             f"forward/backward {a['compute_s']} s; {a['layers']} Linear layers; whole run {doc.get('total_s', 0):.0f} s.",
             "", HOW_TO_READ, "", "## Main table: ftd against each peer (ratios)", "", ratio_table(doc), ""]
    for size in doc["sizes"]:
        parts += [f"## {fmt_size(size['requested_bytes'])} state ({size['state_bytes'] / 2**20:.0f} MiB, "
                  f"{size['params'] / 1e6:.1f}M params)", "", size_table(size), ""]
    for s in doc.get("skipped_sizes", []):
        parts += [f"- size {s['size']} skipped: {s['reason']}"]
    if doc.get("loop"):
        parts += ["", f"## Training-loop overhead ({doc['loop']['model']}, {doc['loop']['steps']} steps)", "",
                  loop_table(doc["loop"]), ""]
    if doc.get("scaling"):
        parts += ["", f"## Scaling on loopback ({doc['scaling']['per_node_mib']} MiB per node, EC n-1+1)", "",
                  scaling_table(doc["scaling"]), ""]
    if doc.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(parts) + "\n"


def plots(doc: dict[str, Any], stem: Path) -> list[Path]:
    """Up to 4 PNGs next to the report; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    for metric, title, suffix in (("stall_compute", "stall per save, with compute", "stall"),
                                  ("restore", "restore time", "restore")):
        keys = [k for k in doc["sizes"][0]["methods"] if "error" not in doc["sizes"][0]["methods"][k]]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(1, len(doc["sizes"]))
        for j, size in enumerate(doc["sizes"]):
            vals = [med(size["methods"].get(k, {}), metric) or float("nan") for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], [v * 1e3 for v in vals], width,
                   label=fmt_size(size["requested_bytes"]))
        ax.set_xticks([i + width * (len(doc["sizes"]) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{suffix}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    if doc.get("loop"):
        cs = [c for c in doc["loop"]["configs"] if "step" in c]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh([c["label"] for c in cs], [c["step"]["median"] * 1e3 for c in cs])
        ax.set_xlabel("median step time, ms")
        ax.set_title("training-loop step time")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-loop.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    if doc.get("scaling"):
        cs = [c for c in doc["scaling"]["clusters"] if "rebuild_s" in c]
        if cs:
            fig, ax = plt.subplots(figsize=(6, 4))
            n = [c["nodes"] for c in cs]
            ax.plot(n, [c["protected_after_seal_s"] for c in cs], "o-", label="last seal -> protected")
            ax.plot(n, [c["rebuild_s"] for c in cs], "s-", label="rebuild one node")
            ax.set_xlabel("nodes (daemons on loopback)")
            ax.set_ylabel("seconds")
            ax.set_xticks(n)
            ax.legend()
            ax.set_title(f"scaling, {doc['scaling']['per_node_mib']} MiB per node")
            fig.tight_layout()
            path = stem.with_name(f"{stem.name}-scaling.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            out.append(path)
    return out
