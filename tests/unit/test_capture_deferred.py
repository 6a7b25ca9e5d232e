"""The per-snapshot fast path (issue 15 §1): `snapshot()` freezes on the caller's thread, the copy thread
encodes later; the manifest is written canonical once and read back without re-serialising; RNG words are
stored as tensors. Each test checks what the old, slower path guaranteed."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from ftd.client import jsonsafe, state
from ftd.errors import ManifestError
from ftd.manifest import DIGEST_KEY, Entry, Manifest, json_depth, manifest_digest, raw_depth
from tests.unit import snapkit

JOB = "unit-deferred"


@pytest.fixture(autouse=True)
def _isolated_rng():
    py, npy, tch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(tch)


def test_values_changed_right_after_snapshot_are_stored_as_they_were(socket_path):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()
    extra = {"position": [1, 2], "nested": {"epoch": 3}, "counter": torch.tensor([7.0])}
    snap = snapkit.snapshotter(socket_path, model, opt, job=JOB, scheduler=sched, extra=extra)
    try:
        random.seed(5)
        np.random.seed(5)
        py_at_call, np_at_call = random.getstate(), np.random.get_state()
        torch_at_call = torch.get_rng_state()
        sched_at_call = json.dumps(sched.state_dict(), sort_keys=True)
        snap.snapshot(1)
        # everything below may change before the copy thread encodes the step
        extra["position"].append(99)
        extra["nested"]["epoch"] = 4
        extra["counter"].add_(1.0)
        random.random()
        np.random.random()
        torch.rand(3)
        sched.step()
        opt.param_groups[0]["lr"] = 123.0
        assert snap.wait(snapkit.WAIT_S)
        assert snap.stats.sealed == 1, dict(snap.stats.skip_reasons)
    finally:
        snap.close()

    model2 = nn.Linear(8, 4)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    extra2 = {"position": [], "nested": {"epoch": 0}, "counter": torch.tensor([0.0])}
    snap2 = snapkit.snapshotter(socket_path, model2, opt2, job=JOB, scheduler=sched2, extra=extra2)
    try:
        assert snap2.restore() == 1
    finally:
        snap2.close()
    restored = snap2.restored_extra
    assert restored["position"] == [1, 2] and restored["nested"] == {"epoch": 3}
    assert extra2["counter"].numpy().tobytes() == torch.tensor([7.0]).numpy().tobytes()
    assert json.dumps(sched2.state_dict(), sort_keys=True) == sched_at_call
    assert opt2.param_groups[0]["lr"] == 0.05
    assert random.getstate() == py_at_call
    got = np.random.get_state()
    assert got[1].tobytes() == np_at_call[1].tobytes() and got[2:] == np_at_call[2:]
    assert torch.get_rng_state().numpy().tobytes() == torch_at_call.numpy().tobytes()


def _roundtrip_rng(rng: dict) -> dict:
    tensors: dict[str, torch.Tensor] = {}
    doc = json.loads(json.dumps(state.encode_rng(rng, lambda name, t: tensors.__setitem__(name, t.clone()))))
    return doc, tensors


def test_rng_words_are_tensors_and_both_stored_forms_read_back():
    random.seed(11)
    np.random.seed(11)
    rng = state.rng_state()
    doc, tensors = _roundtrip_rng(rng)
    assert len(json.dumps(doc)) < 1000  # 624 words each as JSON numbers would be ~15 KB
    assert state.python_rng(jsonsafe.decode(doc["python"], tensors.__getitem__)) == rng["python"]
    np_state = state.numpy_rng(jsonsafe.decode(doc["numpy"], tensors.__getitem__))
    assert np_state[1].dtype == np.uint32 and np_state[1].tobytes() == rng["numpy"][1].tobytes()
    # the form written before the words became tensors: plain JSON numbers
    old_py = jsonsafe.encode(rng["python"], "rng/python", lambda *_: None)
    assert state.python_rng(jsonsafe.decode(json.loads(json.dumps(old_py)), tensors.__getitem__)) == rng["python"]


def _manifest() -> Manifest:
    entries = (Entry("model/w", "param", "float32", (2, 2), 0, 16, (12345678901234,)),)
    return Manifest(job="j", rank=0, world_size=1, step=3, chunk_bytes=1 << 20, data_bytes=16,
                    entries=entries, meta={"step": 3, "note": 'quote " and \\ backslash [{'}, created_at=1.5,
                    run="r", metrics={})


def test_manifest_written_once_still_verifies_and_refuses_edits():
    raw = _manifest().to_json()
    assert raw.endswith(b'"}') and DIGEST_KEY.encode() in raw
    assert Manifest.from_json(raw).step == 3
    edited = raw.replace(b'"step":3', b'"step":4', 1)
    with pytest.raises(ManifestError):
        Manifest.from_json(edited)
    # meta's key order survives (extra, scheduler and optimizer state come back as they were captured)
    assert list(Manifest.from_json(raw).meta) == ["step", "note"]
    # a manifest digested the older way (canonical JSON), in any layout, is checked the full way and accepted
    doc = json.loads(raw)
    body = {k: v for k, v in doc.items() if k != DIGEST_KEY}
    older = json.dumps({DIGEST_KEY: manifest_digest(body), **body}, indent=1).encode()
    assert Manifest.from_json(older).step == 3
    with pytest.raises(ManifestError):
        Manifest.from_json(older.replace(b'"step": 3', b'"step": 5', 1))


@pytest.mark.parametrize("text", [
    '1', '"[[[["', '[]', '{"a": [1, {"b": "}]]\\"\\\\"}]}', '[[[[[["x"]]]]]]', '{"k": "\\\\\\"[", "v": [[]]}',
    '[' * 70 + ']' * 70, '{"ü": ["ß", {"x": null}]}',
])
def test_raw_depth_matches_the_parsed_depth(text):
    assert raw_depth(text.encode()) == json_depth(json.loads(text))
