"""The Hugging Face Trainer and Lightning under torchrun with 3 DDP ranks on gloo, a rank SIGKILLed mid-run:
torchrun restarts every rank, each resumes from the daemon, and every rank's losses and final parameters
equal the same script without ftd, bit for bit.

From 3 ranks on gloo's ring all-reduce sums in an order that depends on DDP's gradient buckets, which DDP
rebuilds after its first step; the callbacks hand the framework's DDP module to the Snapshotter
(`ddp=`), which rebuilds a resumed DDP's buckets as they were (ftd.client.ddp). The scripts run DDP
without find_unused_parameters (with it, DDP never rebuilds its buckets: the Trainer's default for a
PreTrainedModel). Each rank's data comes from the framework's distributed sharding with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ftd.demo import results
from ftd.demo.cluster import LocalNode, torchrun
from ftd.demo.procs import ftd_env, read_losses, wait_for_step
from ftd.errors import FtdError
from tests.bitexact import differing
from tests.integration.scripts import HERE

RANKS = 3
RUN_S = 90  # one 3-rank run of either script on a 2-core machine, two of them side by side
KILL_S = 60  # up to the kill

HF = ("hf_train.py", ["--steps", "12", "--ga", "2", "--no-find-unused"], 24)  # script, arguments, loss records
LIGHTNING = ("lightning_train.py", ["--steps", "12", "--devices", str(RANKS)], 24)


def _needs(*modules: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(all(importlib.util.find_spec(m) is None for m in modules),
                              reason=f"needs {' or '.join(modules)}")


def _files(root: Path) -> list[str]:
    return ["--losses", str(root / "losses.jsonl"), "--out", str(root / "params-{rank}.pt"),
            "--results", str(root / "results-{rank}.jsonl")]


def _script_args(root: Path, script: str, args: list[str]) -> list[str]:
    workdir = ["--workdir", str(root / "out")] if script == "hf_train.py" else []
    return [*args, *workdir, *_files(root)]


def _plain(root: Path, script: str, args: list[str]) -> subprocess.Popen[bytes]:
    """The same script under torchrun without ftd (started, not awaited)."""
    root.mkdir(parents=True)
    worker = [str(HERE / script), *_script_args(root, script, args), "--no-ftd"]
    return torchrun(worker, ftd_env(root, "reference"), root / "train.log", RANKS, 0)


def _wait(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise FtdError(f"torchrun did not finish within {timeout} s:\n{log.read_text()[-4000:]}") from None
    assert rc == 0, log.read_text()[-4000:]


def _assert_equal(node: LocalNode, plain: Path, records: int) -> None:
    firsts = {read_losses(plain / "losses.jsonl", rank).get(0) for rank in range(RANKS)}
    assert len(firsts) == RANKS, "every rank sees data of its own"
    for rank in range(RANKS):
        want, got = read_losses(plain / "losses.jsonl", rank), read_losses(node.losses, rank)
        assert len(want) == records and got == want, f"rank {rank}: losses differ from the script without ftd"
        params = torch.load(node.root / f"params-{rank}.pt", weights_only=True)
        ref = torch.load(plain / f"params-{rank}.pt", weights_only=True)
        assert not differing(params, ref), f"rank {rank}: {differing(params, ref)}"


def _kill_and_resume(node: LocalNode, tmp_path: Path, case: tuple[str, list[str], int]) -> None:
    script, args, records = case
    plain = _plain(tmp_path / "plain", script, args)
    try:
        kill_at = random.Random().randrange(4, records - 6)
        agent = node.torchrun(RANKS, [*_script_args(node.root, script, args), "--step-sleep", "0.2"],
                              program=[str(HERE / script)])
        wait_for_step(node.losses, kill_at, agent, timeout=KILL_S, rank=RANKS - 1)
        node.worker_of_rank(RANKS - 1).send_signal(signal.SIGKILL)
        _wait(agent, node.log, RUN_S)
        _wait(plain, tmp_path / "plain" / "train.log", RUN_S)
    finally:
        if plain.poll() is None:
            plain.kill()
    done = results.latest(node.results(), "done")
    for rank in range(RANKS):
        assert rank in done and done[rank]["restored_step"], f"rank {rank} did not resume (killed at {kill_at})"
    assert len({done[rank]["restored_step"] for rank in range(RANKS)}) == 1, done
    _assert_equal(node, tmp_path / "plain", records)


@_needs("transformers")
@pytest.mark.timeout(KILL_S + 2 * RUN_S + 30)
def test_hf_trainer_ddp_rank_killed_resumes_bit_exact(node: LocalNode, tmp_path: Path):
    _kill_and_resume(node, tmp_path, HF)


@_needs("lightning", "pytorch_lightning")
@pytest.mark.timeout(KILL_S + 2 * RUN_S + 30)
def test_lightning_ddp_rank_killed_resumes_bit_exact(node: LocalNode, tmp_path: Path):
    _kill_and_resume(node, tmp_path, LIGHTNING)
