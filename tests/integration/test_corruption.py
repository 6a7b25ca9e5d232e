"""Corrupt snapshots are detected at restore, named (rank, step, entry), and the previous step is used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ftd.manifest import DIGEST_KEY, manifest_digest
from tests.integration.cluster import STEPS, Cluster, assert_bit_exact

STOP = STEPS // 2


def _flip_byte(seg: Path, manifest: dict) -> str:
    entry = next(e for e in manifest["entries"] if e["name"] == "model/tok.weight")
    with open(seg, "r+b") as f:
        f.seek(entry["offset"] + entry["nbytes"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    return "checksum mismatch"


def _truncate(seg: Path, manifest: dict) -> str:
    os.truncate(seg, seg.stat().st_size // 2)
    return "truncated"


def _reseal(manifest: dict) -> None:
    """Recompute the manifest checksum, so that the check behind it is what refuses the edit."""
    manifest.pop(DIGEST_KEY, None)
    manifest[DIGEST_KEY] = manifest_digest(manifest)


def _point_outside(seg: Path, manifest: dict) -> str:
    manifest["entries"][1]["offset"] = manifest["data_bytes"] + 4096
    _reseal(manifest)
    return "outside the segment"


def _wrong_job(seg: Path, manifest: dict) -> str:
    manifest["job"] = "someone-else"
    _reseal(manifest)
    return "belongs to job 'someone-else'"


def _edit_lr(seg: Path, manifest: dict) -> str:
    manifest["meta"]["optim"]["param_groups"][0]["lr"] = 1000.0
    return "manifest checksum mismatch"


@pytest.mark.parametrize("corrupt", [_flip_byte, _truncate, _point_outside, _wrong_job, _edit_lr],
                         ids=["checksum", "truncated", "manifest-outside-segment", "wrong-job", "edited-lr"])
def test_corrupt_newest_step_falls_back_to_previous(node: Cluster, reference, corrupt):
    node.run_trainer("--stop-at", str(STOP))
    manifests = node.sealed_manifests()
    assert sorted(manifests) == [STOP - 1, STOP]
    path = manifests[STOP]
    doc = json.loads(path.read_bytes())
    expected = corrupt(Path(str(path).removesuffix(".manifest.json") + ".seg"), doc)
    path.write_text(json.dumps(doc))

    node.run_trainer()
    log = node.log.read_text()
    errors = [line for line in log.splitlines() if f"step {STOP} is unusable" in line]
    assert errors and expected in errors[0] and "rank 0" in errors[0], log[-3000:]
    assert f"resumed at step {STOP - 1}" in log
    assert_bit_exact(node, reference)


def test_model_mismatch_is_named_and_training_starts_fresh(node: Cluster):
    node.run_trainer("--stop-at", str(STOP))
    node.run_trainer("--dim", "32", "--stop-at", str(STOP + 2))
    log = node.log.read_text()
    assert "entry 'pos': snapshot holds float32[32, 64], the model has float32[32, 32]" in log, log[-3000:]
    assert "starting from step 0" in log
    assert "resumed at step" not in log
    assert "discarded" not in (node.root / "daemon.log").read_text(), "a mismatched launch discarded snapshots"
