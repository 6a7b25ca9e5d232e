"""A trainer SIGKILLed at a random step resumes from the daemon and ends bit for bit like an uninterrupted run."""

from __future__ import annotations

import random
import signal

from ftd.demo import results
from ftd.demo.cluster import single_node
from ftd.demo.procs import read_losses, wait_for_step

from tests.integration.cluster import STEPS, TRAIN_ARGS, assert_bit_exact, restores


def test_sigkill_at_random_step_resumes_bit_exact(node, reference):
    kill_at = random.Random().randrange(2, STEPS - 3)
    proc = node.trainer([*TRAIN_ARGS, "--step-sleep", "0.05"])
    wait_for_step(node.losses, kill_at, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    node.run_trainer(TRAIN_ARGS)
    restore = restores(node)[-1]
    assert restore["restored_step"] > 0, f"killed at step {kill_at} but the restart did not resume: {restore}"
    assert_bit_exact(node, reference)


def test_daemon_absent_never_stops_training(tmp_path, reference):
    node = single_node(tmp_path, "nodaemon", FTD_DAEMON_WAIT="2")  # nobody listens on its socket; restore() waits 2 s
    node.run_trainer(TRAIN_ARGS)
    done = results.latest(node.results(), "done")[0]
    assert (done["sealed"], done["skip_reasons"]) == (0, {"daemon_unavailable": STEPS}), done
    # one warning when the daemon is missing, not one per step (the log's size, not its words)
    assert len(node.log.read_text().splitlines()) < STEPS, node.log.read_text()[-3000:]
    assert read_losses(node.losses) == reference.rank_losses(0)
