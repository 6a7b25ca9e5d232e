"""Training scripts of the integration tests run as real processes beside a real daemon: start one,
SIGKILL it once it has recorded a given step, run it again to the end, compare bit for bit."""

from __future__ import annotations

import signal
import shutil
import subprocess
import sys
from pathlib import Path

from ftd.demo.cluster import LocalNode
from ftd.demo.procs import read_losses, wait_for_step
from ftd.errors import FtdError
from tests.bitexact import differing

HERE = Path(__file__).resolve().parent


FINISH_S = 120
"""finish()'s default budget."""
KILLED_AND_RESUMED_S = 120 + 30 + FINISH_S
"""run_killed_and_resumed()'s budget: kill_at, the killed process's exit, finish."""


def start(script: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python tests/integration/<script> ARGS`, output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(HERE / script), *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = FINISH_S) -> None:
    """Wait for a script to exit 0 (FtdError with its log's tail otherwise)."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise FtdError(f"{proc.args} did not finish within {timeout} s:\n{log.read_text()[-4000:]}") from None
    if rc != 0:
        raise FtdError(f"{proc.args} exited with {rc}:\n{log.read_text()[-4000:]}")


def kill_at(proc: subprocess.Popen[bytes], losses: Path, step: int, log: Path, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as it has recorded the loss of `step`."""
    try:
        wait_for_step(losses, step, proc, timeout)
    except FtdError as exc:
        raise FtdError(f"{exc}:\n{log.read_text()[-4000:]}") from None
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def stop(proc: subprocess.Popen[bytes], node: LocalNode) -> None:
    """End a reference script (if it still runs) and a test node, and remove the node's memory."""
    proc.kill()
    node.close()
    shutil.rmtree(node.shm, ignore_errors=True)


def run_killed_and_resumed(node: LocalNode, script: str, args: list[str], kill_step: int,
                           sleep: str = "0.2") -> None:
    """One run of `script` SIGKILLed after `kill_step`, then a second run to the end (same files)."""
    files = ["--losses", str(node.losses), "--out", str(node.root / "params.pt"), "--results",
             str(node.root / "results-0.jsonl")]
    proc = start(script, [*args, *files, "--step-sleep", sleep], node.env, node.log)
    kill_at(proc, node.losses, kill_step, node.log)
    finish(start(script, [*args, *files], node.env, node.log), node.log)


def compare(losses: Path, params: dict, ref_losses: Path, ref_params: dict) -> None:
    """Every recorded loss and every final parameter equal the reference's, bit for bit."""
    got, want = read_losses(losses), read_losses(ref_losses)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    diverged = [s for s in sorted(want) if got[s] != want[s]]
    assert not diverged, f"losses differ from step {diverged[0]}: {got[diverged[0]]} vs {want[diverged[0]]}"
    assert not differing(params, ref_params), f"{differing(params, ref_params)} differ"
