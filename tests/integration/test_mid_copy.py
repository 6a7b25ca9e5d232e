"""A trainer killed in the middle of a copy: that step is never sealed, the previous one is restored."""

from __future__ import annotations

import json
import signal
import time

from ftd.client.rpc import DaemonClient
from ftd.demo.procs import wait_for_step

from tests.integration.cluster import STEPS, TRAIN_ARGS, assert_bit_exact, restores


def test_kill_mid_copy_restores_previous_step(node, reference):
    pause_at = STEPS // 2
    env = {"FTD_KNOBS": json.dumps({"pause_copy_at_step": pause_at})}
    proc = node.trainer(TRAIN_ARGS, **env)
    wait_for_step(node.losses, pause_at - 1, proc, timeout=120)  # the copy of step pause_at has been queued
    deadline = time.monotonic() + 30
    while not _copying(node, pause_at):
        assert proc.poll() is None and time.monotonic() < deadline, "the copy of the paused step never began"
        time.sleep(0.01)
    time.sleep(0.2)  # the copy of the first half of the entries (microseconds for this model), then the pause
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    client = DaemonClient(node.env["FTD_SOCKET"], node.env["FTD_JOB"], 0, timeout=5)
    try:
        held = client.list_steps()
    finally:
        client.close()
    assert pause_at not in held, "a half-copied step was sealed"
    assert held[-1] == pause_at - 1, held

    node.run_trainer(TRAIN_ARGS)
    assert restores(node)[-1]["restored_step"] == pause_at - 1
    assert_bit_exact(node, reference)


def _copying(node, step: int) -> bool:
    """The daemon sealed `step - 1` and holds a lease being written: the copy of `step` began."""
    [rank] = node.status().ranks
    return rank.writing and max(rank.sealed_steps, default=-1) == step - 1
