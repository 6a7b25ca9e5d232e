"""Verified reads of a segment (ftd.client.verifycopy): every byte is still checked, a flipped byte in
the segment file is caught by both passes, nothing live is written before the agreement, a fresh
optimizer's state is read into its own memory and the live tensors keep theirs. Real daemon, real shm."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import ftd
from ftd.client import restore as restore_mod
from ftd.client import verifycopy
from ftd.errors import SnapshotCorrupt
from tests.bitexact import same_bytes
from tests.unit import snapkit

JOB = "unit-verifycopy"

_snapshotter = functools.partial(snapkit.snapshotter, job=JOB)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8))


def _trained(socket_path: str, steps: int = 1, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and AdamW after one training step each of `steps` snapshotted steps (1..steps)."""
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with _snapshotter(socket_path, model, opt, **kwargs) as snap:
        for step in range(1, steps + 1):
            opt.zero_grad()
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            snapkit.snap(snap, step)
    return model, opt


def _segment_of(shm: Path, step: int) -> tuple[Path, dict]:
    for path in shm.glob(f"ftd-{JOB}*/rank-0/*.manifest.json"):
        doc = json.loads(path.read_bytes())
        if doc["step"] == step:
            return path.with_name(path.name.removesuffix(".manifest.json") + ".seg"), doc
    raise AssertionError(f"no manifest of step {step} under {shm}")


def _flip(seg: Path, offset: int) -> None:
    with open(seg, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _entry(doc: dict, name: str) -> dict:
    return next(e for e in doc["entries"] if e["name"] == name)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t.detach().clone() for t in model.state_dict().values()]
    for s in opt.state.values():
        out.extend(v.detach().clone() for v in s.values() if isinstance(v, torch.Tensor))
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(same_bytes(x, y) for x, y in zip(a, b))


def test_fresh_restore_is_bit_exact_and_owns_its_optimizer_state(socket_path):
    model, opt = _trained(socket_path)
    want = _state_bytes(model, opt)
    fresh = _model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    params = [p.data_ptr() for p in fresh.parameters()]
    with _snapshotter(socket_path, fresh, fresh_opt) as snap:
        assert snap.restore() == 1
    assert _same(_state_bytes(fresh, fresh_opt), want)
    assert [p.data_ptr() for p in fresh.parameters()] == params  # read into the live parameters
    for s in fresh_opt.state.values():  # private, writable memory (a view of the segment would fault)
        s["exp_avg"].add_(1.0)


def test_restore_into_a_live_optimizer_reads_into_its_tensors(socket_path):
    model, opt = _trained(socket_path)
    want = _state_bytes(model, opt)
    live = _model(1)
    live_opt = torch.optim.AdamW(live.parameters(), lr=0.5)
    live(torch.randn(2, 64)).sum().backward()
    live_opt.step()
    ptrs = [v.data_ptr() for s in live_opt.state.values() for v in s.values() if v.dim()]
    with _snapshotter(socket_path, live, live_opt) as snap:
        assert snap.restore() == 1
    assert _same(_state_bytes(live, live_opt), want)
    assert [v.data_ptr() for s in live_opt.state.values() for v in s.values() if v.dim()] == ptrs


@pytest.mark.parametrize("name", ["model/0.weight", "optim/state/#v0/exp_avg_sq"])
def test_a_flipped_byte_is_caught_before_anything_live_is_written(socket_path, tmp_path, name):
    _trained(socket_path, chunk_bytes=4096)
    seg, doc = _segment_of(tmp_path / "shm", 1)
    entry = _entry(doc, name)
    _flip(seg, entry["offset"] + entry["nbytes"] - 3)  # in the last chunk: the others verify first
    fresh = _model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    before = _state_bytes(fresh, fresh_opt)
    with _snapshotter(socket_path, fresh, fresh_opt, chunk_bytes=4096) as snap:
        assert snap.restore() == 0
        failures = snap.stats.restore_failures
        assert snap.stats.restore_partial_step is None
    assert any("checksum mismatch" in f and name in f for f in failures), failures
    assert _same(_state_bytes(fresh, fresh_opt), before)
    assert not fresh_opt.state


def test_the_load_pass_catches_bytes_changed_after_the_verify(socket_path, tmp_path):
    model, opt = _trained(socket_path, chunk_bytes=4096)
    seg, doc = _segment_of(tmp_path / "shm", 1)
    client = ftd.Snapshotter(_model(0), rank=0, world_size=1, job=JOB, socket=socket_path).client
    live = _model(1)
    opened = restore_mod.open_verified(client, JOB, 0, 1, 1, live)
    try:
        entry = _entry(doc, "model/0.weight")  # 12288 bytes: 3 chunks of 4096
        _flip(seg, entry["offset"] + 5000)
        targets = {"model/0.weight": live[0].weight.detach()}
        with pytest.raises(SnapshotCorrupt, match="changed after it was verified: checksum mismatch in chunk 1"):
            verifycopy.load(opened.segment, opened.manifest, targets, threads=3)
        with pytest.raises(SnapshotCorrupt, match="checksum mismatch in chunk 1"):
            verifycopy.verify(opened.segment, opened.manifest, threads=2)
    finally:
        opened.close()


def test_multi_piece_chunks_on_many_threads_verify_and_load_exactly(socket_path, monkeypatch):
    monkeypatch.setattr(verifycopy, "PIECE_BYTES", 1024)  # 4 pieces per chunk, the last chunks short
    model, opt = _trained(socket_path, chunk_bytes=4096)
    client = ftd.Snapshotter(_model(0), rank=0, world_size=1, job=JOB, socket=socket_path).client
    live = _model(1)
    opened = restore_mod.open_verified(client, JOB, 0, 1, 1, live)
    try:
        verifycopy.verify(opened.segment, opened.manifest, threads=5)
        targets = {f"model/{k}": v.detach() for k, v in live.state_dict().items()}
        targets["model/0.bias"] = torch.empty(3)  # does not fit its entry: left to the copy from the mapping
        loaded = verifycopy.load(opened.segment, opened.manifest, targets, threads=5)
        assert loaded == set(targets) - {"model/0.bias"}
        assert all(same_bytes(live.state_dict()[k], v) for k, v in model.state_dict().items() if k != "0.bias")
    finally:
        opened.close()


def test_a_segment_truncated_after_it_was_opened_is_corrupt_not_a_crash(socket_path, tmp_path):
    _trained(socket_path)
    seg, _ = _segment_of(tmp_path / "shm", 1)
    client = ftd.Snapshotter(_model(0), rank=0, world_size=1, job=JOB, socket=socket_path).client
    opened = restore_mod.open_verified(client, JOB, 0, 1, 1, _model(1))
    try:
        os.truncate(seg, 4096)
        with pytest.raises(SnapshotCorrupt, match="truncated"):
            verifycopy.verify(opened.segment, opened.manifest, threads=2)
    finally:
        opened.close()


def test_prefault_keeps_the_bytes_and_load_counts_an_in_place_write(socket_path):
    values = torch.arange(1 << 16, dtype=torch.float32)
    want = values.clone()
    assert verifycopy.prefault([values, torch.empty(0)], threads=2)
    assert same_bytes(values, want)
    _trained(socket_path)
    client = ftd.Snapshotter(_model(0), rank=0, world_size=1, job=JOB, socket=socket_path).client
    live = _model(1)
    opened = restore_mod.open_verified(client, JOB, 0, 1, 1, live)
    try:
        before = live[0].weight._version
        verifycopy.load(opened.segment, opened.manifest, {"model/0.weight": live[0].weight.detach()})
        assert live[0].weight._version > before
    finally:
        opened.close()
