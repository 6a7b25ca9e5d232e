"""`ftd demo` end to end (a local cluster under torchrun, three kinds of failure), and a bounded chaos run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.demo.chaos import ChaosOptions, run_chaos
from ftd.demo.cluster_demo import RESULT_FILE

DEMO_TIMEOUT_S = 600
# The bounded chaos run's own budgets (reference run, each recovery, the finish) fail it with a table
# that says what went wrong; pytest's timeout sits above their sum so it never cuts the run off first.
CHAOS_KINDS = ("rank", "node", "daemon", "rank", "node")
CHAOS = dict(kills=len(CHAOS_KINDS), nodes=3, ec="2+1", kinds=CHAOS_KINDS, seed=7, steps=200, min_wait=0.5,
             max_wait=2.0, recovery_timeout=120, finish_timeout=240, reference_timeout=300)
CHAOS_BUDGET_S = ChaosOptions(**CHAOS).budget_s()


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_ftd_demo_recovers_every_failure_bit_exact(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "ftd", "demo", "--nodes", "3", "--steps", "70", "--workdir",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    result = json.loads((tmp_path / "demo" / RESULT_FILE).read_text())
    assert result["bit_exact"] and result["comparison"]["compared"] > 0, result["comparison"]
    rows = {row["failure"].split(" (")[0]: row for row in result["rows"]}
    assert set(rows) == {"rank crash", "daemon crash", "node loss"}, result["rows"]
    assert sorted(rows["rank crash"]["ranks_restored"]) == ["0", "1", "2"], rows["rank crash"]
    assert set(rows["rank crash"]["ranks_restored"].values()) == {"local"}, rows["rank crash"]
    # the replaced node's data was decoded from the peers (or fetched from them), the others' is local
    assert "peers" in rows["node loss"]["ranks_restored"].values(), rows["node loss"]
    assert rows["daemon crash"]["segments_adopted"] > 0, rows["daemon crash"]


@pytest.mark.long  # about two minutes on 2 cores: `python -m pytest -m long` (bench/chaos.py for 50 kills)
@pytest.mark.timeout(int(CHAOS_BUDGET_S) + 60)
def test_bounded_chaos_run_every_kind_recovers_bit_exact(tmp_path: Path):
    result = run_chaos(ChaosOptions(**CHAOS, workdir=tmp_path / "chaos"), say=print)
    print(result.table())
    assert result.ok, result.table()
    assert len(result.recoveries) == len(CHAOS_KINDS)
    assert not [k for k in result.kills if k.progress_lost], result.table()
    assert result.restarts_from_0 == 0 and result.unrecoverable == 0, result.table()
    assert result.resumes >= CHAOS["nodes"], result.table()  # at least one group restart resumed on every rank
    node_kills = [k for k in result.kills if k.kind == "node"]
    assert node_kills and all(k.rebuilds for k in node_kills), [k.rebuilds for k in node_kills]
