"""`ftd demo` end to end (a local cluster under torchrun, three kinds of failure), and a bounded chaos run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.demo.chaos import ChaosOptions, run_chaos

DEMO_TIMEOUT_S = 600
# The bounded chaos run's own budgets (reference run, each recovery, the finish) fail it with a table
# that says what went wrong; pytest's timeout sits above their sum so it never cuts the run off first.
CHAOS_KINDS = ("rank", "node", "daemon", "rank", "node")
CHAOS = dict(kills=len(CHAOS_KINDS), nodes=3, ec="2+1", kinds=CHAOS_KINDS, seed=7, steps=300, min_wait=0.5,
             max_wait=2.0, recovery_timeout=120, finish_timeout=240, reference_timeout=300)
CHAOS_BUDGET_S = ChaosOptions(**CHAOS).budget_s()


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_ftd_demo_recovers_every_failure_bit_exact(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "ftd", "demo", "--nodes", "3", "--steps", "70", "--workdir",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "bit-exact with the failure-free run" in text
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^  (rank crash|daemon crash|node loss)\b.*$", text, re.M)}
    assert set(rows) == {"rank crash", "daemon crash", "node loss"}, text[-3000:]
    assert "peers" in rows["node loss"], rows["node loss"]  # the replaced node's data was decoded from the peers
    assert "local" in rows["rank crash"], rows["rank crash"]
    assert all(r.rstrip().endswith("yes") for r in rows.values()), rows


@pytest.mark.timeout(int(CHAOS_BUDGET_S) + 60)
def test_bounded_chaos_run_every_kind_recovers_bit_exact(tmp_path: Path):
    result = run_chaos(ChaosOptions(**CHAOS, workdir=tmp_path / "chaos"), say=print)
    print(result.table())
    assert result.ok, result.table()
    assert len(result.recoveries) == len(CHAOS_KINDS)
    assert not [k for k in result.kills if k.progress_lost], result.table()
    assert result.restarts_from_0 == 0
