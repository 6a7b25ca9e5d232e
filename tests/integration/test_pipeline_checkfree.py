"""A 5-stage pipeline (examples/pipeline_gpt.py) under elastic torchrun on 5 simulated nodes, EC 2+1 (one
group of 5, m = 1). The nodes running stages 1 and 3 are lost at once: more than m nodes of the group,
so their snapshots cannot be decoded. The replacements join, torchrun reassigns ranks, and the
recovery planner restores the surviving stages from memory and rebuilds stages 1 and 3 with
CheckFree from their neighbours; training goes on to the last step with no manual step."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from ftd.demo.cluster import RendezvousStore, all_losses, make_nodes, wait_protected

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipeline_gpt.py"
STAGES = 5
STEPS = 50


def _losses(paths: list[Path]) -> dict[int, list[float]]:
    """step -> every loss the last stage recorded for it (a step re-run after the failure appears twice)."""
    return {step: sorted(losses) for (_, step), losses in all_losses(paths).items()}


@pytest.mark.timeout(200 + 120 + 240 + 60)  # the budgets below (wait_protected: 120 s)
def test_lost_middle_stages_are_rebuilt_with_checkfree_and_training_continues(tmp_path: Path):
    nodes = make_nodes(tmp_path, STAGES, "2+1", FTD_REBUILD_WAIT="8")
    store = RendezvousStore()
    args = ["--steps", str(STEPS), "--step-sleep", "0.15"]
    try:
        for node in nodes:
            node.start_daemon()
        agents = [node.agent(store.port, STAGES, args, "pipe", 3, program=[str(EXAMPLE)]) for node in nodes]
        deadline = time.monotonic() + 200
        while max(_losses([n.losses for n in nodes]), default=-1) < 15:
            assert time.monotonic() < deadline, nodes[0].log.read_text()[-3000:]
            assert all(a.poll() is None for a in agents), "\n".join(n.log.read_text()[-1500:] for n in nodes)
            time.sleep(0.2)
        protected = wait_protected(nodes, 8)
        victims = [n for n in nodes if set(n.worker_ranks()) & {1, 3}]
        assert len(victims) == 2, [n.worker_ranks() for n in nodes]
        for victim in victims:
            victim.lose_everything()
        for victim in victims:
            victim.start_daemon(attempts=5)
            victim.agent(store.port, STAGES, args, "pipe", 3, program=[str(EXAMPLE)])
        for node in nodes:
            assert node.trainers[-1].wait(240) == 0, "\n".join(n.log.read_text()[-2500:] for n in nodes)
    finally:
        for node in nodes:
            node.close()
        store.stop()

    logs = "\n".join(n.log.read_text(errors="replace") for n in nodes)
    rebuilt = re.findall(r"rank (\d+): recovered step (\d+) from checkfree", logs)
    assert sorted(int(r) for r, _ in rebuilt) == [1, 3], logs[-4000:]
    step = int(rebuilt[0][1])
    assert step >= protected and all(int(s) == step for _, s in rebuilt)
    from_memory = re.findall(r"rank (\d+): recovered step (\d+) from (local|peers)", logs)
    assert sorted(int(r) for r, s, _ in from_memory if int(s) == step) == [0, 2, 4], from_memory
    daemon_logs = "\n".join(n.daemon_log.read_text(errors="replace") for n in nodes)
    assert "memory cannot recover" in daemon_logs
    assert re.search(r"recovered step \d+ from checkfree", daemon_logs)
    losses = _losses([n.losses for n in nodes])
    assert set(range(STEPS)) <= set(losses), sorted(set(range(STEPS)) - set(losses))[:10]
    after = [v for s in range(step, STEPS) for v in losses[s]]
    assert all(math.isfinite(v) for v in after)
