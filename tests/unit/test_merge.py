"""`ftd merge` on real snapshots of a small training run (a real daemon with a durable directory, a real
Snapshotter recording the loss): every method equals a float64 hand computation from the sealed bytes, rounded
once; the outputs load with stock safetensors and stock torch.distributed.checkpoint; memory and durable steps
merge alike; bad input is a clear ftd error; the README's recipe runs as written."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ftd
from ftd import cli
from ftd.client.rpc import DaemonClient
from ftd.config import DaemonConfig
from ftd.daemon.server import Daemon
from ftd.durable import layout, reader
from ftd.durable.reader import DurableCorrupt, DurableStep
from ftd.errors import ConfigError, MergeError, SnapshotCorrupt
from ftd.manifest import Manifest
from ftd.merge import Method, merge_steps, round_once, weights
from tests.bitexact import byte_view
from tests.unit.snapkit import snapshotter

JOB = "merge-unit"
WAIT_S = 30.0
README = Path(__file__).resolve().parents[2] / "README.md"


class Net(torch.nn.Module):
    """float32 layers, a BatchNorm (float statistics and an int64 counter) and a bfloat16 head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, 3).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.fc(x))).to(torch.bfloat16)).float()


def _model() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=5e-2)


def _daemon(tmp: Path, **settings) -> Daemon:
    config = DaemonConfig.load(environ={}, job=JOB, socket=str(tmp / "s.sock"), shm_dir=str(tmp / "shm"),
                               memory_reserve="0", metrics_port=0, durable_dir=str(tmp / "durable"), **settings)
    return Daemon(config).start()


def _wait_durable(root: Path, step: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while step not in reader.committed_steps(root):
        assert time.monotonic() < deadline, f"step {step} never became durable: {reader.committed_steps(root)}"
        time.sleep(0.05)


def _snap(s: ftd.Snapshotter, step: int, metrics) -> None:
    """Snapshot `step` with `metrics` and wait until it is sealed."""
    sealed = s.stats.sealed
    s.snapshot(step, metrics=metrics)
    assert s.wait(WAIT_S)
    assert s.stats.sealed == sealed + 1 and s.stats.last_sealed_step == step, dict(s.stats.skip_reasons)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six steps of training, a snapshot (with its loss) after each; steps 2, 4, 6 durable, 4..6 in memory.
    The daemon stays up for the module (the memory source)."""
    tmp = tmp_path_factory.mktemp("merge")
    daemon = _daemon(tmp, keep=3, durable_every=2, durable_keep=3)
    root = layout.job_dir(tmp / "durable", JOB)
    model, opt = _model()
    losses = {}
    try:
        with snapshotter(daemon.config.socket, model, opt, job=JOB) as s:
            for step in range(1, 7):
                torch.manual_seed(100 + step)
                x = torch.randn(16, 8)
                loss = (model(x) - x[:, :3]).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[step] = loss.item()
                _snap(s, step, {"loss": loss, "tokens": 16 * step})  # a tensor and an int: both become floats
                if step % 2 == 0:  # a newer cadence step would skip one not yet written
                    _wait_durable(root, step)
    except BaseException:
        daemon.stop(grace=0.5)
        raise
    yield SimpleNamespace(tmp=tmp, daemon=daemon, socket=daemon.config.socket, durable=tmp / "durable", root=root,
                          losses=losses)
    daemon.stop(grace=0.5)




# ---- the hand computation: from the sealed bytes, in NumPy float64, rounded once -------------------------------

def _sealed(root: Path, step: int) -> dict[str, torch.Tensor]:
    """Every global tensor of durable step `step` (a world of one) as sealed: the rank's segment rebuilt and
    verified by the reader, each placed entry read from its bytes."""
    manifest_json, data = DurableStep.open(root, step).segment(0)
    manifest = Manifest.from_json(manifest_json)
    out = {}
    for e in manifest.entries:
        if e.placement is not None:
            raw = bytearray(data[e.offset:e.offset + e.nbytes])
            out[e.placement.fqn] = torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, e.dtype)).reshape(
                e.shape)
    return out


def _hand(xs: list[torch.Tensor], method: str, decay: float, p: list[float]) -> np.ndarray:
    a = [x.to(torch.float64).numpy() for x in xs]
    if method == "ema":
        m = a[0]
        for x in a[1:]:
            m = decay * m + (1.0 - decay) * x
        return m
    m = p[0] * a[0]
    for pi, x in zip(p[1:], a[1:]):
        m = m + pi * x
    return m


def _bf16_bits(v: float) -> int:
    """The bfloat16 nearest to `v` (ties to even), found by exact rational comparison of its neighbours."""
    base = int(np.array(v, dtype=np.float32).view(np.uint32)) >> 16
    best = None
    for c in (base - 1, base, base + 1):
        value = float(np.array(c << 16, dtype=np.uint32).view(np.float32)) if 0 <= c <= 0xFFFF else math.nan
        if math.isfinite(value):
            key = (abs(Fraction(value) - Fraction(v)), c & 1)
            best = (key, c) if best is None or key < best[0] else best
    return best[1]


def _rounded(m: np.ndarray, dtype: torch.dtype) -> bytes:
    if dtype == torch.float32:
        return m.astype(np.float32).tobytes()
    assert dtype == torch.bfloat16, dtype
    return np.array([_bf16_bits(float(v)) for v in m.ravel()], dtype=np.uint16).tobytes()


def _bytes(t: torch.Tensor) -> bytes:
    return byte_view(t).numpy().tobytes()


CASES = {
    "uniform": {"method": "uniform"},
    "ema": {"method": "ema", "decay": 0.8},
    "weighted-loss": {"method": "weighted", "metric": "loss", "temperature": 0.2},
    "weighted-step": {"method": "weighted", "metric": "step", "penalty": 0.3},
}


def _weights(case: dict, steps: list[int], losses: dict[int, float]) -> list[float]:
    """The weights of the module docstring of ftd.merge, computed here from the recorded losses."""
    n = len(steps)
    if case["method"] == "uniform":
        return [1.0 / n] * n
    if case["method"] == "ema":
        d = case["decay"]
        return [d ** (n - 1)] + [(1.0 - d) * d ** (n - 1 - i) for i in range(1, n)]
    if case["metric"] == "step":
        w = [math.exp(-case["penalty"] * (steps[-1] - s)) for s in steps]
    else:
        v = [losses[s] for s in steps]
        w = [math.exp(-(x - min(v)) / case["temperature"]) for x in v]
    return [x / math.fsum(w) for x in w]


def _expected(sealed: list[dict[str, torch.Tensor]], fqn: str, case: dict, p: list[float]) -> bytes:
    x = sealed[-1][fqn]
    if not x.dtype.is_floating_point or fqn.endswith(".step"):
        return _bytes(x)  # integers and step counters: the newest step's
    return _rounded(_hand([s[fqn] for s in sealed], case["method"], case.get("decay", 0.0), p), x.dtype)


# ---- tests --------------------------------------------------------------------------------------------------

def test_metrics_reach_the_manifest_in_memory_and_in_the_durable_tier(run):
    client = DaemonClient(run.socket, JOB, -1, 10.0)
    try:
        for step in (4, 6):
            want = {"loss": run.losses[step], "tokens": 16.0 * step}
            durable = Manifest.from_json(DurableStep.open(run.root, step).record(0).manifest_json)
            memory = Manifest.from_json(client.open(step, rank=0).manifest_json)
            assert durable.metrics == want and memory.metrics == want
    finally:
        client.close()


@pytest.mark.parametrize("name", CASES)
def test_each_method_equals_a_float64_hand_computation_rounded_once(run, tmp_path, name):
    load_file = pytest.importorskip("safetensors.torch").load_file
    case, steps = CASES[name], [2, 4, 6]
    out = tmp_path / "soup.safetensors"
    result = merge_steps(job=JOB, durable_dir=str(run.durable), steps=steps, out=out, **case)
    p = _weights(case, steps, run.losses)
    assert result.weights == p and math.isclose(sum(p), 1.0)
    assert len(set(p)) > 1 or name == "uniform"
    sealed = [_sealed(run.root, s) for s in steps]
    merged = load_file(str(out))  # stock safetensors
    Net().load_state_dict(merged)  # strict: every name, shape and dtype of the model
    model_fqns = sorted(f for f in sealed[0] if f.startswith("model."))
    assert sorted("model." + k for k in merged) == model_fqns
    for fqn in model_fqns:
        assert _bytes(merged[fqn.removeprefix("model.")]) == _expected(sealed, fqn, case, p), fqn
    for s in sealed:  # an average, not a copy of one step
        assert _bytes(merged["fc.weight"]) != _bytes(s["model.fc.weight"])
        assert _bytes(merged["head.weight"]) != _bytes(s["model.head.weight"])
    assert result.newest == ["model.norm.num_batches_tracked"]
    summary = json.loads((tmp_path / "soup.ftd-merge.json").read_text())
    assert (summary["steps"], summary["method"], summary["weights"]) == (steps, case["method"], p)
    assert summary["metric_values"] == ([run.losses[s] for s in steps] if name == "weighted-loss" else
                                        [float(s) for s in steps] if name == "weighted-step" else None)


def test_the_dcp_output_loads_with_stock_dcp_and_carries_the_merged_optimizer(run, tmp_path):
    pytest.importorskip("safetensors")
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    case, steps = {"method": "ema", "decay": 0.5}, [2, 4, 6]
    out, weights_file = tmp_path / "soup", tmp_path / "soup.safetensors"
    result = merge_steps(job=JOB, durable_dir=str(run.durable), steps=steps, out=[out, weights_file],
                         include_optim=True, **case)
    fresh, fresh_opt = _model()
    fresh(torch.randn(4, 8)).sum().backward()
    fresh_opt.step()  # an optimizer with state to load into
    msd, osd = get_model_state_dict(fresh), get_optimizer_state_dict(fresh, fresh_opt)
    dcp.load({"model": msd, "optim": {"state": osd["state"]}}, storage_reader=dcp.HuggingFaceStorageReader(str(out)))
    sealed = [_sealed(run.root, s) for s in steps]
    p = _weights(case, steps, run.losses)
    for name, tensor in msd.items():
        assert _bytes(tensor) == _expected(sealed, f"model.{name}", case, p), name
    optim = [(f"optim.state.{param}.{key}", t) for param, state in osd["state"].items() for key, t in state.items()]
    assert len(optim) == 6 * 3  # six parameters: step, exp_avg, exp_avg_sq
    for fqn, tensor in optim:
        assert _bytes(tensor) == _expected(sealed, fqn, case, p), fqn
    assert "optim.state.fc.weight.step" in result.newest and "optim.state.fc.weight.exp_avg" in result.averaged
    weights = load_file(str(weights_file))  # the model only, the same bytes
    assert sorted(weights) == sorted(msd) and all(_bytes(weights[k]) == _bytes(msd[k]) for k in msd)
    summary = json.loads((out / "ftd-merge.json").read_text())
    assert summary["include_optim"] and summary["decay"] == 0.5 and summary["outputs"] == [str(out),
                                                                                          str(weights_file)]


def test_memory_steps_merge_to_the_bytes_of_their_durable_copies(run, tmp_path):
    client = DaemonClient(run.socket, JOB, -1, 10.0)
    try:
        held = {r.rank: list(r.sealed_steps) for r in client.status().ranks}
    finally:
        client.close()
    common = sorted(set(held[0]) & set(reader.committed_steps(run.root)))
    assert common == [4, 6] and 5 in held[0]
    case = {"method": "weighted", "metric": "loss", "temperature": 0.5}
    memory = merge_steps(job=JOB, socket=run.socket, steps=common, out=tmp_path / "memory.safetensors", **case)
    durable = merge_steps(job=JOB, durable_dir=str(run.durable), steps=common, out=tmp_path / "durable.safetensors",
                          **case)
    assert (memory.source, durable.source) == ("memory", "durable")
    assert memory.metric_values == [run.losses[s] for s in common] == durable.metric_values
    assert (tmp_path / "memory.safetensors").read_bytes() == (tmp_path / "durable.safetensors").read_bytes()
    newest = merge_steps(job=JOB, socket=run.socket, last=2, out=tmp_path / "last.safetensors")
    assert newest.steps == [5, 6]  # step 5 is held in memory only


def test_round_once_does_not_round_twice():
    # just above a tie of bfloat16 (float16) that the float32 in between would land on: torch's own conversion
    # rounds to the tie, then to even, and ends below
    x = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 3.0, 1e-45], dtype=torch.float64)
    assert round_once(x, torch.bfloat16).tolist() == [1 + 2**-7, -(1 + 2**-7), 1.0, 3.0, 0.0]
    assert x.to(torch.bfloat16).tolist()[0] == 1.0  # what round_once must not do
    h = torch.tensor([1 + 2**-11 + 2**-40, 70000.0, 65519.0], dtype=torch.float64)
    assert round_once(h, torch.float16).tolist() == [1 + 2**-10, math.inf, 65504.0]
    assert h.to(torch.float16).tolist()[0] == 1.0
    r = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e3
    assert _bytes(round_once(r, torch.bfloat16)) == _rounded(r.numpy(), torch.bfloat16)
    assert _bytes(round_once(r, torch.float32)) == _rounded(r.numpy(), torch.float32)


def test_weights_by_a_metric_to_maximize_and_non_finite_metrics():
    recorded = [{"acc": 0.5}, {"acc": 0.75}, {"acc": 0.25}]
    p, values = weights(Method("weighted", metric="acc", temperature=0.25, maximize=True), [1, 2, 3], recorded)
    w = [math.exp(-1.0), 1.0, math.exp(-2.0)]
    assert values == [0.5, 0.75, 0.25] and p == [x / math.fsum(w) for x in w]
    with pytest.raises(MergeError, match="step 2 recorded loss = nan: cannot weight by it"):
        weights(Method("weighted"), [1, 2], [{"loss": 1.0}, {"loss": math.nan}])
    with pytest.raises(ConfigError, match="maximize applies to a recorded metric"):
        weights(Method("weighted", metric="step", penalty=1.0, maximize=True), [1, 2], [{}, {}])


def test_bad_requests_are_clear_errors(run, tmp_path):
    d, out = str(run.durable), tmp_path / "x.safetensors"
    with pytest.raises(MergeError, match=r"step\(s\) \[3\] are not in the durable directory .* holds \[2, 4, 6\]"):
        merge_steps(job=JOB, durable_dir=d, steps=[2, 3], out=out)
    with pytest.raises(MergeError, match="holds 3 step.* fewer than the 5 asked for"):
        merge_steps(job=JOB, durable_dir=d, last=5, out=out)
    with pytest.raises(MergeError, match="step 2 recorded no metric 'accuracy'"):
        merge_steps(job=JOB, durable_dir=d, last=3, method="weighted", metric="accuracy", out=out)
    with pytest.raises(ConfigError, match=r"decay must be in \[0, 1\)"):
        merge_steps(job=JOB, durable_dir=d, last=3, method="ema", decay=1.0, out=out)
    with pytest.raises(ConfigError, match="needs a penalty"):
        merge_steps(job=JOB, durable_dir=d, last=3, method="weighted", metric="step", out=out)
    with pytest.raises(ConfigError, match="a penalty weights by step"):
        merge_steps(job=JOB, durable_dir=d, last=3, method="weighted", metric="loss", penalty=0.1, out=out)
    with pytest.raises(ConfigError, match="temperature of metric weighting must be > 0"):
        merge_steps(job=JOB, durable_dir=d, last=3, method="weighted", temperature=0.0, out=out)
    with pytest.raises(ConfigError, match="not one of uniform, ema, weighted"):
        merge_steps(job=JOB, durable_dir=d, last=3, method="soup", out=out)
    with pytest.raises(ConfigError, match="either the steps"):
        merge_steps(job=JOB, durable_dir=d, out=out)
    with pytest.raises(MergeError, match=r"step\(s\) \[2\] are not in this node's memory"):
        merge_steps(job=JOB, socket=run.socket, steps=[2, 4], out=out)
    with pytest.raises(MergeError, match="no committed|are not in the durable directory"):
        merge_steps(job="other-job", durable_dir=d, steps=[2], out=out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"")
    with pytest.raises(MergeError, match="exists: merge never overwrites"):
        merge_steps(job=JOB, durable_dir=d, last=2, out=out)
    assert out.read_bytes() == b""


@pytest.mark.parametrize("victim, message", [
    ("tensors", "checksum mismatch in model/fc.weight"),
    ("sidecar", "does not match the step's index"),
    ("index", "does not match its commit marker"),
])
def test_a_tampered_durable_step_is_refused_and_nothing_is_left(run, tmp_path, victim, message):
    copy = tmp_path / "durable"
    shutil.copytree(run.durable, copy)
    step_dir = layout.step_dir(copy, JOB, 4)
    if victim == "tensors":
        path = step_dir / layout.tensors_file(0)
        record = layout.RankRecord.from_bytes((step_dir / layout.sidecar_file(0)).read_bytes(), "sidecar")
        at = sum(record.tensors["model/fc.weight"]) // 2
    else:
        path = step_dir / (layout.sidecar_file(0) if victim == "sidecar" else layout.INDEX)
        at = path.stat().st_size // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DurableCorrupt, match=message):
        merge_steps(job=JOB, durable_dir=str(copy), steps=[2, 4, 6],
                    out=[tmp_path / "soup", tmp_path / "w.safetensors"])
    assert [p.name for p in tmp_path.iterdir()] == ["durable"]  # no output, no temporary file


def test_a_durable_file_gone_or_an_unwritable_target_is_a_merge_error(run, tmp_path):
    copy = tmp_path / "durable"
    shutil.copytree(run.durable, copy)
    (layout.step_dir(copy, JOB, 6) / layout.tensors_file(0)).unlink()
    with pytest.raises(MergeError, match=r"rank-00000.safetensors: No such file"):
        merge_steps(job=JOB, durable_dir=str(copy), steps=[4, 6], out=tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["durable"]
    with pytest.raises(MergeError, match="is not a directory"):
        merge_steps(job=JOB, durable_dir=str(run.durable), steps=[4], out=tmp_path / "none" / "w.safetensors")


def test_a_memory_step_that_changes_while_read_is_refused(run, tmp_path):
    import os

    client = DaemonClient(run.socket, JOB, -1, 10.0)
    try:
        reply = client.open(5, rank=0)
    finally:
        client.close()
    entry = Manifest.from_json(reply.manifest_json).entry_map()["model/fc.weight"]
    fd = os.open(reply.path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, entry.offset + 5)
        os.pwrite(fd, bytes([old[0] ^ 0x01]), entry.offset + 5)
        with pytest.raises(SnapshotCorrupt, match="rank 0, step 5, entry 'model/fc.weight': checksum mismatch"):
            merge_steps(job=JOB, socket=run.socket, steps=[5, 6], out=tmp_path / "w.safetensors")
    finally:
        os.pwrite(fd, old, entry.offset + 5)
        os.close(fd)
    assert list(tmp_path.iterdir()) == []


def test_steps_holding_other_tensors_are_refused_and_world_sizes_may_differ(tmp_path):
    """Steps 2 (Linear 8->4), 4 (8->5), 6 (another name), and 8 and 10 of the model of 6 taken by a world of 2."""
    daemon = _daemon(tmp_path, durable_every=2, durable_keep=5, keep=4)
    root = layout.job_dir(tmp_path / "durable", JOB)
    d = str(tmp_path / "durable")
    try:
        for step, width, name, world in ((2, 4, "fc", 1), (4, 5, "fc", 1), (6, 5, "proj", 1), (8, 5, "proj", 2),
                                         (10, 5, "proj", 2)):
            torch.manual_seed(step)
            model = torch.nn.ModuleDict({name: torch.nn.Linear(8, width)})
            snaps = [ftd.Snapshotter(model, rank=r, world_size=world, job=JOB, socket=daemon.config.socket)
                     for r in range(world)]
            for at in (step - 1, step):  # every rank has said hello by the cadence step
                for s in snaps:
                    _snap(s, at, {"loss": 1.0 / at})
            for s in snaps:
                s.close()
            _wait_durable(root, step)
        # two ranks of one node in memory: the same bytes as their durable copies
        memory = merge_steps(job=JOB, socket=daemon.config.socket, steps=[8, 10], out=tmp_path / "m.safetensors")
        merge_steps(job=JOB, durable_dir=d, steps=[8, 10], out=tmp_path / "d.safetensors")
        assert memory.world_sizes == [2, 2]
        assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()
    finally:
        daemon.stop(grace=0.5)
    out = tmp_path / "w.safetensors"
    with pytest.raises(MergeError, match=r"model.fc.bias: step 2 holds float32\[4\], step 4 float32\[5\]"):
        merge_steps(job=JOB, durable_dir=d, steps=[2, 4], out=out)
    with pytest.raises(MergeError, match=r"steps 4 and 6 hold different tensors: \['model.fc.bias'"):
        merge_steps(job=JOB, durable_dir=d, steps=[4, 6], out=out)
    result = merge_steps(job=JOB, durable_dir=d, steps=[6, 8, 10], method="weighted", metric="loss", out=out)
    assert result.world_sizes == [1, 2, 2] and result.metric_values == [1 / 6, 1 / 8, 1 / 10]
    sealed = [_sealed(root, 6)] + [{f: t for f, t in _sealed(root, s).items()} for s in (8, 10)]
    p = _weights({"method": "weighted", "metric": "loss", "temperature": 1.0}, [6, 8, 10], {6: 1 / 6, 8: 1 / 8,
                                                                                           10: 1 / 10})
    from safetensors.torch import load_file

    merged = load_file(str(out))
    for key in ("proj.weight", "proj.bias"):
        assert _bytes(merged[key]) == _rounded(_hand([s["model." + key] for s in sealed], "weighted", 0.0, p),
                                               torch.float32)


def test_snapshot_records_metrics_and_skips_a_step_whose_metrics_are_bad(socket_path):
    model = torch.nn.Linear(2, 2)
    with snapshotter(socket_path, model, job=JOB) as s:
        _snap(s, 1, {"loss": np.float32(0.25), "lr": 1e-3, "nan": math.nan})
        for step, bad in enumerate([{"loss": "low"}, {"loss": True}, {"x" * 129: 1.0}, {"loss": torch.ones(2)},
                                    [("loss", 1.0)], {f"m{i}": 1.0 for i in range(65)}], start=2):
            s.snapshot(step, metrics=bad)
            assert s.wait(WAIT_S)
        assert s.stats.sealed == 1 and s.stats.skip_reasons == {"metrics": 6}
    client = DaemonClient(socket_path, JOB, -1, 10.0)
    try:
        recorded = Manifest.from_json(client.open(1, rank=0).manifest_json).metrics
    finally:
        client.close()
    assert recorded["loss"] == 0.25 and recorded["lr"] == 1e-3 and math.isnan(recorded["nan"])


# ---- the command line ---------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in [n for n in os.environ if n.startswith("FTD_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_cli_merge_writes_what_the_api_writes(run, tmp_path, capsys, clean_env):
    api = merge_steps(job=JOB, durable_dir=str(run.durable), steps=[2, 4, 6], method="ema", decay=0.8,
                      out=tmp_path / "api.safetensors")
    rc = cli.main(["merge", "--durable-dir", str(run.durable), "--job", JOB, "--steps", "2,4,6", "--method", "ema",
                   "--decay", "0.8", "--out", str(tmp_path / "cli.safetensors"), "--out", str(tmp_path / "dcp"),
                   "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["steps"], doc["method"], doc["decay"], doc["weights"]) == ([2, 4, 6], "ema", 0.8, api.weights)
    assert (tmp_path / "cli.safetensors").read_bytes() == (tmp_path / "api.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == ["ftd-merge.json", "rank-00000.safetensors"]
    clean_env.setenv("FTD_SOCKET", run.socket)
    rc = cli.main(["merge", "--memory", "--job", JOB, "--last", "2", "--method", "weighted", "--metric", "step",
                   "--penalty", "0.5", "--out", str(tmp_path / "mem.safetensors"), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["source"], doc["steps"], doc["weights"]) == ("memory", [5, 6], _weights(
        {"method": "weighted", "metric": "step", "penalty": 0.5}, [5, 6], run.losses))


@pytest.mark.parametrize("args, message", [
    (["--steps", "2,7"], r"ftd merge: step\(s\) \[7\] are not in the durable directory"),
    (["--last", "2", "--method", "weighted", "--metric", "step"], "ftd merge: weighting by step needs a penalty"),
    (["--last", "2", "--no-durable"], "ftd merge: say where the steps are"),
])
def test_cli_merge_errors_are_one_line(run, tmp_path, capsys, clean_env, args, message):
    base = ["merge", "--job", JOB, "--out", str(tmp_path / "w.safetensors")]
    if "--no-durable" in args:
        args = [a for a in args if a != "--no-durable"]
    else:
        base += ["--durable-dir", str(run.durable)]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# ---- the README ---------------------------------------------------------------------------------------------

SECTION = "## Averaging snapshots: `ftd merge`"


def test_the_readme_section_runs_as_written(run, tmp_path, clean_env):
    pytest.importorskip("safetensors")
    text = README.read_text()
    heads = re.findall(r"^## .*$", text, re.M)
    assert heads[heads.index("## What a node holds: `ftd ls`, `ftd rm`, `ftd export`") + 1] == SECTION
    start = text.index(SECTION)
    section = text[start:text.index("\n## ", start)]
    subs = {"/lustre/ckpt": str(run.durable), "/lustre/soups": str(tmp_path), '"gpt"': repr(JOB),
            "--job gpt": f"--job {JOB}", "--steps 4000,6000": "--steps 4,6"}

    def local(code: str) -> str:
        for old, new in subs.items():
            code = code.replace(old, new)
        return code

    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    commands = [shlex.split(local(line), comments=True) for lang, body in blocks if lang == "sh"
                for line in body.splitlines() if line.startswith("ftd merge")]
    recipes = [local(body) for lang, body in blocks if lang == "python" and "merge_steps" in body]
    assert len(commands) >= 3 and len(recipes) == 1
    clean_env.setenv("FTD_SOCKET", run.socket)
    for argv in commands:
        assert cli.main(argv[1:]) == 0, argv
    model = Net()
    exec(compile(recipes[0], "README.md", "exec"), {"model": model})  # noqa: S102 - the README's own recipe
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in written if n.endswith(".safetensors")]) >= 3, written
    assert "snapshot(step + 1, metrics=" in section
