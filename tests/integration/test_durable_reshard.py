"""Restore onto another world size from the durable tier: 4 FSDP2 ranks persist step 8 and stop; every
byte of memory is wiped; 2 FSDP2 ranks restore it (resharded through DCP's load planning) and their
parameter shards, laid side by side, are the bytes the 4 ranks had sealed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ftd.demo import results
from ftd.demo.cluster import single_node
from ftd.durable import layout, reader

from tests.bitexact import byte_view
from tests.integration.cluster import sealed_globals

STEP = 8
TRAIN = ["--steps", "24", "--stop-at", str(STEP), "--fsdp"]


@pytest.mark.timeout(30 + 150 + 60 + 30 + 150 + 30)  # the budgets below
def test_four_fsdp2_ranks_resume_as_two_from_the_durable_tier(tmp_path: Path):
    durable = tmp_path / "durable"
    node = single_node(tmp_path / "node", "reshard", FTD_DURABLE_DIR=str(durable), FTD_DURABLE_EVERY="4")
    root = layout.job_dir(durable, "reshard")
    try:
        node.start_daemon()
        assert node.torchrun(4, TRAIN, max_restarts=0).wait(150) == 0, node.log.read_text()[-3000:]
        deadline = time.monotonic() + 60
        while STEP not in reader.committed_steps(root):
            assert time.monotonic() < deadline, reader.committed_steps(root)
            time.sleep(0.1)
        sealed = sealed_globals([node], STEP)
        node.lose_everything()
        node.start_daemon()
        second = time.time()
        assert node.torchrun(2, TRAIN, max_restarts=0).wait(150) == 0, node.log.read_text()[-3000:]
    finally:
        node.close()

    done = {rank: r for rank, r in results.latest(node.results(), "done").items() if r["time"] > second}
    assert sorted(done) == [0, 1], done
    assert all(r["restored_step"] == STEP and r["restore_resharded"] and r["restore_source"] == "durable"
               for r in done.values()), done
    shards = [node.params(rank) for rank in range(2)]
    assert shards[0].keys() == shards[1].keys() and shards[0]
    for name in shards[0]:
        full = torch.cat([shards[0][name], shards[1][name]]) if shards[0][name].dim() else shards[0][name]
        want = sealed[f"model.{name}"]
        assert full.shape == want.shape, name
        assert torch.equal(byte_view(full), byte_view(want)), f"{name} differs from the sealed bytes"
