"""The Hugging Face Trainer with ftd's callback: a tiny Llama trained, SIGKILLed mid-epoch and relaunched
resumes from the daemon, and every micro-batch loss and the final parameters equal an uninterrupted
run without ftd, bit for bit (dropout on, gradient accumulation 2, an epoch boundary crossed)."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

from ftd.demo import results  # noqa: E402
from ftd.demo.cluster import single_node  # noqa: E402
from ftd.demo.procs import ftd_env  # noqa: E402
from tests.integration import scripts  # noqa: E402

ARGS = ["--steps", "12", "--ga", "2"]  # 40 samples, batch 4: 10 batches = 5 steps per epoch


@pytest.mark.timeout(scripts.KILLED_AND_RESUMED_S + scripts.FINISH_S + 30)  # the budgets below
def test_hf_trainer_sigkill_resumes_bit_exact(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = scripts.start("hf_train.py", [*ARGS, "--no-ftd", "--workdir", str(ref_dir), "--losses",
                                        str(ref_dir / "losses.jsonl"), "--out", str(ref_dir / "params.pt")],
                        ftd_env(ref_dir, "reference"), ref_dir / "train.log")
    node = single_node(tmp_path / "node", "hftest")
    node.start_daemon()
    try:
        # killed after the first micro-batch of step 8 (epoch 1, mid-epoch): resumes at step 7 or 6
        scripts.run_killed_and_resumed(node, "hf_train.py", [*ARGS, "--workdir", str(node.root / "out")], 2 * 7)
        scripts.finish(ref, ref_dir / "train.log")
        done = results.latest(node.results(), "done")[0]
        assert done["restored_step"] in (6, 7), done
        assert done["restore_source"] == "local" and done["sealed"] == 12 - done["restored_step"], done
        assert done["log_history"][0]["step"] == 1  # the Trainer's log history came back with the state
        scripts.compare(node.losses, torch.load(node.root / "params.pt", weights_only=True),
                        ref_dir / "losses.jsonl", torch.load(ref_dir / "params.pt", weights_only=True))
    finally:
        scripts.stop(ref, node)
