"""`ftd demo` end to end (a local cluster under torchrun, three kinds of failure), and a bounded chaos run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ftd.demo.chaos import ChaosOptions, run_chaos


def test_ftd_demo_recovers_every_failure_bit_exact(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "ftd", "demo", "--nodes", "3", "--steps", "70", "--workdir",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "bit-exact with the failure-free run" in text
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^  (rank crash|daemon crash|node loss)\b.*$", text, re.M)}
    assert set(rows) == {"rank crash", "daemon crash", "node loss"}, text[-3000:]
    assert "peers" in rows["node loss"], rows["node loss"]  # the replaced node's data was decoded from the peers
    assert "local" in rows["rank crash"], rows["rank crash"]
    assert all(r.rstrip().endswith("yes") for r in rows.values()), rows


def test_bounded_chaos_run_every_kind_recovers_bit_exact(tmp_path: Path):
    kinds = ("rank", "node", "daemon", "rank", "node")
    result = run_chaos(ChaosOptions(kills=len(kinds), nodes=3, ec="2+1", kinds=kinds, seed=7, steps=800,
                                    min_wait=0.5, max_wait=2.0, recovery_timeout=150, finish_timeout=300,
                                    workdir=tmp_path / "chaos"), say=print)
    print(result.table())
    assert result.ok, result.table()
    assert len(result.recoveries) == len(kinds)
    assert not [k for k in result.kills if k.progress_lost], result.table()
    assert result.restarts_from_0 == 0
