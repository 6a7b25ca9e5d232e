"""The durable-tier benchmark on a tiny state: it finishes, and its JSON holds loop figures for every
configuration it ran (two interleaved rounds) and a seal -> durable figure for ftd beside the raw write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(150)
def test_durable_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ftd.bench.durable", "--state-mb", "4", "--batch", "8", "--every", "2", "--rounds", "2",
         "--warmup", "1", "--configs", "none,ftd,dcp_thread,raw_io", "--raw-repeats", "1",
         "--dir", str(tmp_path), "--out-dir", str(out), "--tag=-test"],
        capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("durable-*-test.json")
    doc = json.loads(path.read_text())
    loop = doc["summary"]["loop"]
    assert sorted(loop) == ["dcp_thread", "ftd", "none", "raw_io"]
    for key, row in loop.items():
        assert row["units"] == 2 and math.isfinite(row["mean_step_s"]) and row["mean_step_s"] > 0, (key, row)
    seal = doc["summary"]["seal"]["ftd"]
    assert seal["count"] >= 1 and 0 < seal["seal_to_durable_mean_s"] < 60
    raw = doc["summary"]["raw"]
    assert seal["idle_seal_to_durable_s"] > 0 and raw["idle_write_median_s"] > 0 and raw["training_mean_s"] > 0
    assert seal["durable_step_bytes"] > 4 << 20
    assert not any(p.name.startswith("ftd-durable-bench-") for p in tmp_path.iterdir())  # scratch removed
