"""A daemon SIGKILLed while it writes a durable step: the previous durable step stays committed and
loads, verified; the half-written step is never committed; the restarted daemon (its memory intact)
writes the step again and commits it, and the dead writer's temporary files are gone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import ftd
from ftd.demo.cluster import single_node
from ftd.durable import layout, reader
from ftd.durable.reader import DurableStep

JOB = "durable-crash"
WAIT_S = 60.0


def _wait(predicate, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.timeout(3 * 30 + 3 * 60 + 30)  # daemon starts, the waits below
def test_daemon_killed_mid_persist_keeps_the_previous_durable_step(tmp_path: Path):
    durable = tmp_path / "durable"
    node = single_node(tmp_path / "node", JOB, FTD_DURABLE_DIR=str(durable), FTD_DURABLE_EVERY="2",
                       FTD_DURABLE_BANDWIDTH="2M")  # 4 MiB of state: ~2 s per durable step
    root = layout.job_dir(durable, JOB)
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    node.start_daemon()
    try:
        snap = ftd.Snapshotter(model, opt, rank=0, world_size=1, job=JOB, socket=node.env["FTD_SOCKET"])
        for step in range(1, 5):
            model(torch.randn(2, 512)).sum().backward()
            opt.step()
            opt.zero_grad()
            snap.snapshot(step)
            assert snap.wait(30) and snap.stats.last_sealed_step == step
            if step == 2:
                _wait(lambda: reader.committed_steps(root) == [2], "step 2 never became durable")
        partial = layout.step_dir(durable, JOB, 4)
        _wait(lambda: any(partial.glob(".*.tmp")), "the daemon never started writing step 4")
        node.daemon.kill()  # SIGKILL mid-file
        assert reader.committed_steps(root) == [2]
        assert not (partial / layout.COMMIT).exists()
        manifest_json, data = DurableStep.open(root, 2).segment(0)  # verified, every entry
        assert len(data) > 4 << 20 and b'"step":2' in manifest_json

        node.start_daemon()  # memory intact: it re-adopts step 4 and writes it again
        _wait(lambda: reader.committed_steps(root) == [2, 4], "step 4 was not written again")
        # The dead writer's temp files go with the pass that follows the commit (not at the same instant).
        _wait(lambda: not list(partial.glob(".*.tmp")), "the dead writer's temp files were never removed")
        assert node.status().durable_step == 4
        snap.close()
    finally:
        node.close()
