"""`ftd bench` on a tiny state: the runner finishes, and its JSON and markdown hold a row with
positive numbers for every method it was asked for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

METHODS = ["torch_save_shm", "dcp_save", "ftd", "memcpy"]


@pytest.mark.timeout(120)
def test_compare_tiny(tmp_path: Path) -> None:
    from ftd.bench.methods import METHODS as KNOWN

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTD_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "ftd.bench.compare", "--sizes", "8MiB", "--repeats", "1", "--methods",
         ",".join(METHODS), "--compute-s", "0.05", "--restore", "inprocess", "--no-loop", "--no-scaling",
         "--no-plots", "--out-dir", str(out), "--tag=-test"],
        capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons, mds = list(out.glob("compare-*-test.json")), list(out.glob("compare-*-test.md"))
    assert len(jsons) == 1 and len(mds) == 1, sorted(p.name for p in out.iterdir())
    doc = json.loads(jsons[0].read_text())
    assert [s["requested_bytes"] for s in doc["sizes"]] == [8 << 20]
    size = doc["sizes"][0]
    assert size["state_bytes"] > 7 << 20
    assert sorted(size["methods"]) == sorted(METHODS)
    for key, row in size["methods"].items():
        assert "error" not in row, (key, row.get("error"))
        for metric in ("stall_compute", "stall_nocompute", "done", "restore"):
            value = row[metric]["median"]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, metric, value)
        assert row["bytes_written"] >= size["state_bytes"] * 0.9, (key, row["bytes_written"])
        assert row["peak_rss"] > 0
    assert size["methods"]["ftd"]["daemon_peak_rss"] > 0
    md = mds[0].read_text()
    assert "## Main table" in md and "How to read this" in md
    main_table = md.split("## Main table", 1)[1].split("\n## ", 1)[0]
    for key in METHODS:
        label = KNOWN[key][0]
        assert label in md, label
        if key != "ftd":  # one ratio row per peer, each with numbers
            line = next(ln for ln in main_table.splitlines() if label in ln)
            assert line.count("x |") == 4, line
