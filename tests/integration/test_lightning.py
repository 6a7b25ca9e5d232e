"""PyTorch Lightning with ftd's callback: a tiny LightningModule trained, SIGKILLed mid-epoch and relaunched
resumes from the daemon, and every batch's loss and the final parameters equal an uninterrupted run
without ftd, bit for bit (dropout on, gradient accumulation 2, shuffled ResumableDataLoader, an epoch
boundary crossed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("lightning") is None:
    pytest.importorskip("pytorch_lightning")

from ftd.demo import results  # noqa: E402
from ftd.demo.cluster import single_node  # noqa: E402
from ftd.demo.procs import ftd_env  # noqa: E402
from ftd.demo.procs import read_losses  # noqa: E402
from tests.integration import scripts  # noqa: E402

ARGS = ["--steps", "12"]  # 12 batches = 6 optimizer steps per epoch


@pytest.mark.timeout(scripts.KILLED_AND_RESUMED_S + scripts.FINISH_S + 30)  # the budgets below
def test_lightning_sigkill_resumes_bit_exact(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = scripts.start("lightning_train.py", [*ARGS, "--no-ftd", "--losses", str(ref_dir / "losses.jsonl"),
                                               "--out", str(ref_dir / "params.pt")],
                        ftd_env(ref_dir, "reference"), ref_dir / "train.log")
    node = single_node(tmp_path / "node", "pltest")
    node.start_daemon()
    try:
        # killed at batch 16 (epoch 1, batch 4: optimizer step 8 done): resumes at step 8 or 7
        scripts.run_killed_and_resumed(node, "lightning_train.py", ARGS, 16)
        scripts.finish(ref, ref_dir / "train.log")
        done = results.latest(node.results(), "done")[0]
        assert done["restored_step"] in (7, 8), done
        # every step after the restored one but step 12, which closes epoch 1 (not snapshotted)
        assert done["sealed"] == 12 - done["restored_step"] - 1 and done["global_step"] == 12, done
        scripts.compare(node.losses, torch.load(node.root / "params.pt", weights_only=True),
                        ref_dir / "losses.jsonl", torch.load(ref_dir / "params.pt", weights_only=True))
    finally:
        scripts.stop(ref, node)


def _ftd_env(node, monkeypatch):
    for key, value in node.env.items():
        if key.startswith("FTD_"):
            monkeypatch.setenv(key, value)


def test_lightning_resume_at_an_epoch_end_is_exact_a_plain_loader_mid_epoch_is_not(node, tmp_path, monkeypatch):
    """In one process: fits that stop at a step and fits that resume it, against one uninterrupted fit."""
    from tests.integration import lightning_train as lt

    _ftd_env(node, monkeypatch)
    ref_losses = tmp_path / "ref.jsonl"
    ref, _, _ = lt.fit(12, 12, str(ref_losses), use_ftd=False)

    # stopped where epoch 0 closes (step 6, which is not snapshotted): resumed at step 5, exact
    losses = tmp_path / "boundary.jsonl"
    lt.fit(6, 12, str(losses))
    resumed, trainer, cb = lt.fit(12, 12, str(losses))
    assert cb.restored_step == 5 and trainer.global_step == 12
    scripts.compare(losses, resumed.state_dict(), ref_losses, ref.state_dict())

    # a plain shuffled DataLoader stopped mid-epoch (step 8): Lightning restarts the epoch's batches
    monkeypatch.setenv("FTD_RUN", "plain-loader")  # another run identity: the steps above are not resumed
    plain = tmp_path / "plain.jsonl"
    lt.fit(8, 12, str(plain), plain_loader=True)
    _, trainer, cb = lt.fit(12, 12, str(plain), plain_loader=True)
    assert cb.restored_step == 8 and trainer.global_step == 12
    got = read_losses(plain)
    lt_ref = tmp_path / "plain-ref.jsonl"
    lt.fit(12, 12, str(lt_ref), use_ftd=False, plain_loader=True)
    want = read_losses(lt_ref)
    assert sorted(got) == sorted(want)
    assert all(got[s] == want[s] for s in range(16)), "the steps before the stop are the uninterrupted run's"
    assert any(got[s] != want[s] for s in range(16, 24)), "a plain loader resumed mid-epoch re-reads the epoch"
