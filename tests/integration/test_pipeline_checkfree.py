"""A 5-stage pipeline (examples/pipeline_gpt.py) under elastic torchrun on 5 simulated nodes, EC 2+1 (one
group of 5, m = 1). The nodes running stages 1 and 3 are lost at once: more than m nodes of the group,
so their snapshots cannot be decoded. The replacements join, torchrun reassigns ranks, and the
recovery planner restores the surviving stages from memory and rebuilds stages 1 and 3 with
CheckFree from their neighbours; training goes on to the last step with no manual step."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from ftd.demo import results
from ftd.demo.cluster import RendezvousStore, all_losses

from tests.integration.cluster import make_nodes, wait_protected

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
        scrapes = [node.metrics() for node in nodes]  # the survivors' daemons and the replacements'
    finally:
        for node in nodes:
            node.close()
        store.stop()

    done = results.latest([r for n in nodes for r in n.results()], "done")
    assert sorted(done) == list(range(STAGES)), done
    sources = {rank: (d["restore_source"], d["restored_step"]) for rank, d in done.items()}
    step = sources[1][1]
    assert step >= protected and all(s == step for _, s in sources.values()), sources
    assert sorted(r for r, (src, _) in sources.items() if src == "checkfree") == [1, 3], sources
    assert all(sources[r][0] in ("local", "peers") for r in (0, 2, 4)), sources
    assert sum(m.value("ftd_recoveries_total", source="checkfree") for m in scrapes) == 2
    replaced = [m for m, n in zip(scrapes, nodes) if any(n is v for v in victims)]
    assert all(m.value("ftd_rebuilds_total", outcome="unrecoverable") >= 1 for m in replaced), \
        [m.by_label("ftd_rebuilds_total", "outcome") for m in replaced]
    losses = _losses([n.losses for n in nodes])
    assert set(range(STEPS)) <= set(losses), sorted(set(range(STEPS)) - set(losses))[:10]
    after = [v for s in range(step, STEPS) for v in losses[s]]
    assert all(math.isfinite(v) for v in after)
