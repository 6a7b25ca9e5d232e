"""The daemon is SIGKILLed and restarted while a trainer runs: no sealed snapshot is lost, training
never stops, and a later trainer crash still resumes bit for bit."""

from __future__ import annotations

import json
import re
import signal

from ftd.demo.procs import wait_for_step

from tests.integration.cluster import STEPS, assert_bit_exact


def test_daemon_sigkill_loses_no_snapshot(node, reference):
    proc = node.trainer("--step-sleep", "0.1")
    wait_for_step(node.losses, STEPS // 3, proc, timeout=120)
    node.daemon.kill(signal.SIGKILL)
    sealed_before = sorted(node.sealed_manifests())
    assert sealed_before, "the daemon held no sealed snapshot when it was killed"

    mark = (node.root / "daemon.log").stat().st_size
    node.start_daemon()
    restarted_log = (node.root / "daemon.log").read_text()[mark:]
    adopted = sorted(int(s) for s in re.findall(r"re-adopted rank 0 step (\d+)", restarted_log))
    assert adopted == sealed_before, f"sealed before the kill: {sealed_before}, re-adopted: {adopted}"

    wait_for_step(node.losses, 2 * STEPS // 3, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    node.run_trainer()

    log = node.log.read_text()
    assert "is back; snapshots resume" in log, "the trainer never reconnected to the restarted daemon"
    resumed = [int(line.split("resumed at step ")[1].split()[0]) for line in log.splitlines() if "resumed at step" in line]
    assert resumed and resumed[-1] > max(sealed_before), "the resume did not use snapshots taken after the restart"
    assert_bit_exact(node, reference)


def test_restarted_daemon_readopts_and_serves(node, reference):
    node.run_trainer("--stop-at", str(STEPS // 2))
    held = sorted(node.sealed_manifests())
    node.daemon.kill(signal.SIGKILL)
    node.start_daemon()
    assert f"re-adopted {len(held)} sealed segment(s)" in (node.root / "daemon.log").read_text()
    node.run_trainer()
    assert f"resumed at step {held[-1]}" in node.log.read_text()
    assert json.loads(node.sealed_manifests()[STEPS].read_bytes())["step"] == STEPS
    assert_bit_exact(node, reference)
