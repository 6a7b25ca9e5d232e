"""The daemon is SIGKILLed and restarted while a trainer runs: no sealed snapshot is lost, training
never stops, and a later trainer crash still resumes bit for bit."""

from __future__ import annotations

import json
import signal

from ftd.demo.procs import wait_for_step

from tests.integration.cluster import STEPS, TRAIN_ARGS, assert_bit_exact, restores


def test_daemon_sigkill_loses_no_snapshot(node, reference):
    proc = node.trainer([*TRAIN_ARGS, "--step-sleep", "0.1"])
    wait_for_step(node.losses, STEPS // 3, proc, timeout=120)
    proc.send_signal(signal.SIGSTOP)  # nothing is sealed until the restarted daemon has been asked what it holds
    node.daemon.kill(signal.SIGKILL)
    sealed_before = sorted(node.sealed_manifests())
    assert sealed_before, "the daemon held no sealed snapshot when it was killed"

    node.start_daemon()
    adopted = node.metrics().value("ftd_segments_adopted_total")
    held = list(node.status().ranks[0].sealed_steps)
    proc.send_signal(signal.SIGCONT)
    assert (adopted, held) == (len(sealed_before), sealed_before), f"sealed before the kill: {sealed_before}"

    wait_for_step(node.losses, 2 * STEPS // 3, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    node.run_trainer(TRAIN_ARGS)

    # the resumed step was sealed after the daemon came back: the trainer reconnected to it
    assert restores(node)[-1]["restored_step"] > max(sealed_before), restores(node)
    assert_bit_exact(node, reference)


def test_restarted_daemon_readopts_and_serves(node, reference):
    node.run_trainer([*TRAIN_ARGS, "--stop-at", str(STEPS // 2)])
    held = sorted(node.sealed_manifests())
    node.daemon.kill(signal.SIGKILL)
    node.start_daemon()
    assert node.metrics().value("ftd_segments_adopted_total") == len(held)
    assert list(node.status().ranks[0].sealed_steps) == held
    node.run_trainer(TRAIN_ARGS)
    assert restores(node)[-1]["restored_step"] == held[-1]
    assert json.loads(node.sealed_manifests()[STEPS].read_bytes())["step"] == STEPS
    assert_bit_exact(node, reference)
