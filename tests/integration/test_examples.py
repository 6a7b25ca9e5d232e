"""The scripts in examples/ run under torchrun as README documents, and resume from the daemon."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftd.demo import results
from ftd.demo.cluster import LocalNode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _torchrun(node: LocalNode, script: str, steps: int) -> dict[int, results.Record]:
    """One launch of the script on 2 ranks; each rank's "done" record."""
    since = time.time()
    # --standalone draws a new run id per launch; continuing a finished run is asked for by naming the run
    agent = node.torchrun(2, ["--steps", str(steps), "--results", node.results_path], program=[str(EXAMPLES / script)],
                          max_restarts=1, FTD_RUN="examples")
    assert agent.wait(200) == 0, node.log.read_text()[-4000:]
    return results.latest([r for r in node.results() if r["time"] >= since], "done")


@pytest.mark.parametrize("script", ["ddp_gpt.py", "zero_gpt.py"])
@pytest.mark.timeout(2 * 200 + 40)  # two launches
def test_example_snapshots_and_resumes(node: LocalNode, script: str):
    first = _torchrun(node, script, 6)
    assert {r: (d["started_at"], d["last_step"], d["last_sealed_step"]) for r, d in first.items()} == \
        {0: (0, 6, 6), 1: (0, 6, 6)}, first
    second = _torchrun(node, script, 10)
    assert {r: (d["started_at"], d["restored_step"], d["last_sealed_step"]) for r, d in second.items()} == \
        {0: (6, 6, 10), 1: (6, 6, 10)}, second
