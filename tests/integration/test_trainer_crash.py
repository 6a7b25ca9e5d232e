"""A trainer SIGKILLed at a random step resumes from the daemon and ends bit for bit like an uninterrupted run."""

from __future__ import annotations

import random
import signal

from ftd.demo.procs import wait_for_step

from tests.integration.cluster import STEPS, assert_bit_exact


def test_sigkill_at_random_step_resumes_bit_exact(node, reference):
    kill_at = random.Random().randrange(2, STEPS - 3)
    proc = node.trainer("--step-sleep", "0.05")
    wait_for_step(node.losses, kill_at, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    node.run_trainer()
    log = node.log.read_text()
    assert "resumed at step" in log, f"killed at step {kill_at} but the restart did not resume:\n{log[-3000:]}"
    assert_bit_exact(node, reference)


def test_daemon_absent_never_stops_training(tmp_path, reference):
    from ftd.demo.procs import ftd_env, read_losses, start_trainer

    env = ftd_env(tmp_path, "nodaemon", FTD_DAEMON_WAIT="2")  # nobody listens on this socket; restore() waits 2 s for it
    losses = tmp_path / "l.jsonl"
    proc = start_trainer(["--steps", str(STEPS), "--losses", str(losses), "--out", str(tmp_path / "p.pt")], env,
                         tmp_path / "train.log")
    assert proc.wait(180) == 0
    log = (tmp_path / "train.log").read_text()
    assert log.count("snapshots are skipped until it is back") == 1, "expected one warning, not one per step"
    assert f"0 snapshots sealed, {STEPS} skipped" in log
    assert read_losses(losses) == reference[0]
