"""Corrupt snapshots are detected at restore, named (rank, step, entry), and the previous step is used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ftd.manifest import DIGEST_KEY, manifest_digest
from ftd.demo.cluster import LocalNode

from tests.integration.cluster import STEPS, assert_bit_exact, restores

STOP = STEPS // 2


def _flip_byte(seg: Path, manifest: dict) -> str:
    entry = next(e for e in manifest["entries"] if e["name"] == "model/tok.weight")
    with open(seg, "r+b") as f:
        f.seek(entry["offset"] + entry["nbytes"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    _reseal(manifest)  # written back re-serialised: only the segment's chunk checksum may refuse it
    return "checksum mismatch in chunk"


def _truncate(seg: Path, manifest: dict) -> str:
    os.truncate(seg, seg.stat().st_size // 2)
    _reseal(manifest)  # the manifest is written back re-serialised: its digest is then the canonical one
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
def test_corrupt_newest_step_falls_back_to_previous(node: LocalNode, reference, corrupt):
    node.run_trainer(["--steps", str(STEPS), "--stop-at", str(STOP)])
    manifests = node.sealed_manifests()
    assert sorted(manifests) == [STOP - 1, STOP]
    path = manifests[STOP]
    doc = json.loads(path.read_bytes())
    expected = corrupt(Path(str(path).removesuffix(".manifest.json") + ".seg"), doc)
    path.write_text(json.dumps(doc))

    node.run_trainer(["--steps", str(STEPS)])
    restore = restores(node)[-1]
    assert list(restore["restore_unusable"]) == [str(STOP)], restore
    assert expected in restore["restore_unusable"][str(STOP)], restore
    assert restore["restored_step"] == STOP - 1, restore
    assert_bit_exact(node, reference)


def test_model_mismatch_is_named_and_training_starts_fresh(node: LocalNode):
    node.run_trainer(["--steps", str(STEPS), "--stop-at", str(STOP)])
    node.run_trainer(["--steps", str(STEPS), "--dim", "32", "--stop-at", "0"])  # restores, trains no step
    restore = restores(node)[-1]
    assert restore["restored_step"] == 0 and sorted(restore["restore_held"]) == [STOP - 1, STOP], restore
    why = "entry 'pos': snapshot holds float32[32, 64], the model has float32[32, 32]"
    assert all(why in restore["restore_unusable"].get(str(s), "") for s in (STOP, STOP - 1)), restore
    assert node.status().ranks[0].sealed_steps == [STOP - 1, STOP], "a mismatched launch discarded snapshots"
