"""A trainer killed in the middle of a copy: that step is never sealed, the previous one is restored."""

from __future__ import annotations

import json
import signal
import time

from ftd.client.rpc import DaemonClient

from tests.integration.cluster import STEPS, assert_bit_exact


def test_kill_mid_copy_restores_previous_step(node, reference):
    pause_at = STEPS // 2
    env = dict(node.env, FTD_KNOBS=json.dumps({"pause_copy_at_step": pause_at}))
    proc = node.trainer(env=env)
    deadline = time.monotonic() + 120
    while "debug pause half-way" not in (node.log.read_text() if node.log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, "the copy never reached its pause"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    client = DaemonClient(node.env["FTD_SOCKET"], node.env["FTD_JOB"], 0, timeout=5)
    try:
        held = client.list_steps()
    finally:
        client.close()
    assert pause_at not in held, "a half-copied step was sealed"
    assert held[-1] == pause_at - 1, held

    node.run_trainer()
    assert f"resumed at step {pause_at - 1}" in node.log.read_text()
    assert_bit_exact(node, reference)
