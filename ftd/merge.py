"""`ftd merge`: checkpoint averaging over steps of one training run (docs/ARCHITECTURE.md §14).

    result = ftd.merge.merge_steps(job="gpt", durable_dir="/lustre/ckpt", last=3, method="ema", decay=0.9,
                                   out="soup.safetensors")

Sources. The durable tier (`durable_dir`): committed steps, every file verified as it is read
(commit marker, index, sidecars, then each piece against its writer's chunk checksums), any
world size, any number of nodes. Or this node's memory (`durable_dir=None`): the sealed
segments the job's daemon holds, opened through its `Open` RPC and mapped read-only; every rank
of each step must be held on this node (a single-node job; on several nodes, `ftd export` the
steps into a shared directory and merge from there). A memory step may be evicted and its
segment reused while it is read: each piece is copied out first and then checked against its
chunk checksums, so that is a SnapshotCorrupt, never a torn average.

Methods, over the chosen steps s_1 < ... < s_n with tensors x_1 .. x_n, in float64 (complex128):

- `uniform`: m = sum_i p_i x_i with p_i = 1/n;
- `ema`: m_1 = x_1, m_i = d * m_{i-1} + (1 - d) * x_i (oldest to newest; no bias correction);
- `weighted`: m = sum_i p_i x_i with p_i = w_i / fsum(w), and
  by a recorded metric v_i (default `loss`; lower is better, `maximize=True` for higher):
  w_i = exp(-(v_i - min_j v_j) / T), i.e. softmax(-v / T) (T = `temperature`, default 1);
  by `metric="step"`: w_i = exp(-lambda * (s_n - s_i)) (lambda = `penalty`, required).
  A step's metric is the mean over the ranks that recorded it (`snapshot(step, metrics=...)`).

Sums run oldest to newest, one float64 product and one float64 sum per step and element; the
result is rounded once to the tensor's dtype, to nearest even (for bfloat16, float16 and float8
by way of a float32 rounded to odd, so there is no second rounding). Integer and bool tensors
(step counters, `num_batches_tracked`) and optimizer `step` entries are not averaged: the newest
step's value is taken. By default the model (`model.*`) is merged; `include_optim=True` adds the
optimizer state (`optim.state.*`). Tensors are merged one at a time: one accumulator, and one
step's copy of the tensor, in memory at once.

Outputs (`out`, one or several paths): a path ending in `.safetensors` gets the model's merged
weights, keyed by the model's own names (`safetensors.torch.load_file`, `model.load_state_dict`),
and `<stem>.ftd-merge.json` beside it; any other path becomes a directory holding
`rank-00000.safetensors` in the durable tier's format (DCP names and DCP's sharding header: stock
`torch.distributed.checkpoint` with `HuggingFaceStorageReader` loads it onto any world size) and
`ftd-merge.json`. The JSON says what was merged: steps, method, settings, metric values, weights.
Outputs are written under temporary names and renamed when complete; existing ones are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ftd.errors import ConfigError, ManifestError, MergeError, NotFound, SnapshotCorrupt
from ftd.manifest import Entry, Manifest, chunk_checksums

log = logging.getLogger(__name__)

METHODS = ("uniform", "ema", "weighted")
SUMMARY_FORMAT = 1
WEIGHTS_SUFFIX = ".safetensors"
DCP_FILE = "rank-00000.safetensors"
SUMMARY_FILE = "ftd-merge.json"
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Method:
    """How to merge: `name` is uniform, ema or weighted; the other fields are that method's settings."""

    name: str = "uniform"
    decay: float = 0.9  # ema
    metric: str = "loss"  # weighted: a recorded metric, or "step"
    temperature: float = 1.0  # weighted by a metric
    penalty: float | None = None  # weighted by step
    maximize: bool = False  # weighted by a metric where higher is better

    def check(self) -> None:
        """ConfigError for a method or setting that cannot work."""
        if self.name not in METHODS:
            raise ConfigError(f"merge method {self.name!r} is not one of {', '.join(METHODS)}")
        if self.name == "ema" and not (math.isfinite(self.decay) and 0.0 <= self.decay < 1.0):
            raise ConfigError(f"ema decay must be in [0, 1), got {self.decay}")
        if self.name != "weighted":
            return
        if self.metric == "step":
            if self.maximize:
                raise ConfigError("maximize applies to a recorded metric, not to weighting by step")
            if self.penalty is None or not math.isfinite(self.penalty) or self.penalty < 0:
                raise ConfigError(f"weighting by step needs a penalty >= 0 (w_i = exp(-penalty * (s_n - s_i))), "
                                  f"got {self.penalty}")
        elif self.penalty is not None:
            raise ConfigError(f"a penalty weights by step (metric 'step'); metric {self.metric!r} is weighted by "
                              "its temperature")
        elif not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"the temperature of metric weighting must be > 0, got {self.temperature}")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.name}
        if self.name == "ema":
            doc["decay"] = self.decay
        elif self.name == "weighted":
            doc["metric"] = self.metric
            if self.metric == "step":
                doc["penalty"] = self.penalty
            else:
                doc.update(temperature=self.temperature, maximize=self.maximize)
        return doc


def weights(method: Method, steps: Sequence[int], metrics: Sequence[dict[str, float]]) -> tuple[list[float],
                                                                                               list[float] | None]:
    """(p_1..p_n, the metric values used) for steps oldest first; `metrics[i]` is step i's recorded metrics.

    For ema the p_i are the weights the recursion amounts to (d^(n-1) for the oldest, (1-d) d^(n-i)
    for the others); the merge itself runs the recursion. MergeError when a metric is missing or
    not finite.
    """
    method.check()
    n = len(steps)
    if method.name == "uniform":
        return [1.0 / n] * n, None
    if method.name == "ema":
        d = method.decay
        return [d ** (n - 1)] + [(1.0 - d) * d ** (n - 1 - i) for i in range(1, n)], None
    if method.metric == "step":
        values = [float(s) for s in steps]
        z = [method.penalty * (steps[-1] - s) for s in steps]  # type: ignore[operator]
    else:
        values = []
        for step, recorded in zip(steps, metrics):
            value = recorded.get(method.metric)
            if value is None:
                raise MergeError(f"step {step} recorded no metric {method.metric!r} (it has "
                                 f"{sorted(recorded) or 'none'}): pass metrics={{{method.metric!r}: ...}} to "
                                 "snapshot(), or weight by step")
            if not math.isfinite(value):
                raise MergeError(f"step {step} recorded {method.metric} = {value}: cannot weight by it")
            values.append(value)
        best = max(values) if method.maximize else min(values)
        z = [abs(v - best) / method.temperature for v in values]
    w = [math.exp(-zi) for zi in z]
    total = math.fsum(w)
    return [wi / total for wi in w], values


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (float64 or complex128) rounded once to `dtype`, to nearest even.

    float32 and complex64 are a direct conversion. torch converts float64 to bfloat16, float16
    and float8 through float32, rounding twice; here the float32 is rounded to odd instead
    (truncated toward zero, lowest bit set when inexact), which makes the second rounding exact.
    """
    if x.dtype == dtype:
        return x
    if x.is_complex() or dtype == torch.float32:
        return x.to(dtype)
    y = x.to(torch.float32)
    back = y.to(torch.float64)
    inexact = back != x
    away = inexact & (back.abs() > x.abs())
    y = torch.where(away, torch.nextafter(y, torch.zeros_like(y)), y)
    bits = y.view(torch.int32)
    odd = torch.where(inexact, bits | 1, bits)
    return odd.view(torch.float32).to(dtype)


class StepSource(Protocol):
    """One step of a run: its global tensors by DCP name, read whole and verified."""

    step: int
    world_size: int
    metrics: dict[str, float]  # mean over the ranks that recorded each
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # fqn -> (dtype, global shape)

    def read(self, fqn: str) -> torch.Tensor: ...

    def close(self) -> None: ...


def _mean_metrics(manifests: Sequence[Manifest]) -> dict[str, float]:
    seen: dict[str, list[float]] = {}
    for m in manifests:
        for name, value in m.metrics.items():
            seen.setdefault(name, []).append(value)
    return {name: math.fsum(values) / len(values) for name, values in seen.items()}


@dataclass(frozen=True)
class _Piece:
    offsets: tuple[int, ...]
    box: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def _assemble(fqn: str, dtype: str, shape: tuple[int, ...], pieces: list[_Piece], where: str) -> torch.Tensor:
    """The global tensor from its pieces (checked to lie inside it and to tile it exactly)."""
    from ftd.client.dcpload import tiles
    from ftd.client.segments import torch_dtype

    if (any(len(p.offsets) != len(shape) or len(p.box) != len(shape) for p in pieces)
            or not tiles([(p.offsets, p.box) for p in pieces], shape)):
        raise SnapshotCorrupt(f"{where}: the pieces of {fqn} do not tile its shape {list(shape)}")
    if len(pieces) == 1:
        return pieces[0].read().reshape(shape)
    out = torch.empty(shape, dtype=torch_dtype(dtype))
    for p in pieces:
        target = out
        for dim, (o, b) in enumerate(zip(p.offsets, p.box)):
            target = target.narrow(dim, o, b)
        target.copy_(p.read().reshape(p.box))
    return out


class DurableSource:
    """A committed durable step: marker, index and every rank's sidecar verified at open, pieces as read."""

    def __init__(self, job_root: Path, step: int):
        from ftd.client.reshard import DurableReader
        from ftd.durable.reader import DurableCorrupt, DurableStep

        self.opened = DurableStep.open(job_root, step)
        self.step, self.world_size = step, self.opened.index.world_size
        manifests = []
        for rank in range(self.world_size):
            try:
                m = Manifest.from_json(self.opened.record(rank).manifest_json)
            except ManifestError as exc:
                raise DurableCorrupt(f"step {step}: rank {rank}'s manifest: {exc}") from None
            if (m.rank, m.step) != (rank, step):
                raise DurableCorrupt(f"step {step}: rank {rank}'s sidecar holds rank {m.rank} step {m.step}")
            manifests.append(m)
        self.metrics = _mean_metrics(manifests)
        self.tensors = {fqn: (dtype, shape) for fqn, (dtype, shape, _) in self.opened.index.globals.items()}
        self._reader = DurableReader(self.opened)

    def read(self, fqn: str) -> torch.Tensor:
        dtype, shape, pieces = self.opened.index.globals[fqn]
        return _assemble(fqn, dtype, shape, [_Piece(p.offsets, p.box, lambda p=p: self._piece(fqn, p.offsets, p.box))
                                             for p in pieces], f"durable step {self.step}")

    def _piece(self, fqn: str, offsets: tuple[int, ...], box: tuple[int, ...]) -> torch.Tensor:
        """A whole piece, read and checked against its writer's chunk checksums (DurableReader)."""
        flat, start = self._reader.read_elements(fqn, offsets, 0, math.prod(box))
        return flat[start:start + math.prod(box)]

    def close(self) -> None:
        pass


class MemorySource:
    """A step this node's daemon holds for every rank: segments mapped read-only, pieces checked as copied out."""

    def __init__(self, client: Any, job: str, step: int, held: dict[int, list[int]]):
        from ftd.client.segments import MappedSegment
        from ftd.durable.safetensors import DTYPES

        self.step, self._segments = step, []
        self._manifests: list[Manifest] = []
        try:
            rank, world = 0, 1
            while rank < world:
                if step not in held.get(rank, ()):
                    raise MergeError(f"step {step} of rank {rank} is not in this node's memory (world size {world}; "
                                     f"it holds ranks {sorted(held)}): on a multi-node job run `ftd export {step} DIR` "
                                     "on every node and merge from DIR")
                try:
                    reply = client.open(step, rank=rank)
                except NotFound as exc:
                    raise MergeError(f"step {step} of rank {rank} is no longer held: {exc}") from None
                m = Manifest.from_json(reply.manifest_json)
                if m.job != job or (m.rank, m.step) != (rank, step):
                    raise SnapshotCorrupt(f"the daemon handed over job {m.job!r} rank {m.rank} step {m.step}",
                                          rank=rank, step=step)
                if rank == 0:
                    world = m.world_size
                elif m.world_size != world:
                    raise SnapshotCorrupt(f"taken by a world of {m.world_size}, rank 0 by {world}", rank=rank,
                                          step=step)
                m.validate(reply.capacity)
                self._segments.append(MappedSegment(reply.path, m.data_bytes, writable=False,
                                                    trust=client.segment_trust()))
                self._manifests.append(m)
                rank += 1
        except BaseException:
            self.close()
            raise
        self.world_size = world
        self.metrics = _mean_metrics(self._manifests)
        found: dict[str, tuple[str, tuple[int, ...], dict[tuple[int, ...], tuple[int, Entry]]]] = {}
        for rank, m in enumerate(self._manifests):
            for e in m.entries:
                p = e.placement
                if p is None or e.dtype not in DTYPES:
                    continue
                dtype, shape, pieces = found.setdefault(p.fqn, (e.dtype, p.shape, {}))
                if (dtype, shape) != (e.dtype, p.shape):
                    raise SnapshotCorrupt(f"{p.fqn}: rank {rank} holds {e.dtype}{list(p.shape)}, another rank "
                                          f"{dtype}{list(shape)}", step=step)
                if p.offsets not in pieces or p.write:  # the writer's copy of a replicated piece, else any
                    pieces[p.offsets] = (rank, e)
        self._found = found
        self.tensors = {fqn: (dtype, shape) for fqn, (dtype, shape, _) in found.items()}

    def _copy(self, rank: int, e: Entry) -> torch.Tensor:
        from ftd.client.segments import torch_dtype

        m = self._manifests[rank]
        view = self._segments[rank].memoryview()
        try:
            data = bytearray(view[e.offset:e.offset + e.nbytes])
        finally:
            view.release()
        if chunk_checksums(memoryview(data), m.chunk_bytes) != e.checksums:
            raise SnapshotCorrupt("checksum mismatch: the segment is corrupt, or the daemon evicted and reused it "
                                  "while it was read (export the steps and merge from the durable tier)",
                                  rank=rank, step=self.step, entry=e.name)
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(torch_dtype(e.dtype))

    def read(self, fqn: str) -> torch.Tensor:
        dtype, shape, pieces = self._found[fqn]
        return _assemble(fqn, dtype, shape, [_Piece(offsets, e.placement.box,  # type: ignore[union-attr]
                                                    lambda r=rank, e=e: self._copy(r, e))
                                             for offsets, (rank, e) in pieces.items()], f"memory step {self.step}")

    def close(self) -> None:
        for seg in self._segments:
            seg.close()
        self._segments = []


def select_steps(available: Sequence[int], steps: Sequence[int] | None, last: int | None, where: str) -> list[int]:
    """The steps to merge, oldest first: `steps` (each must be available) or the newest `last` of `available`."""
    if (steps is None) == (last is None):
        raise ConfigError("give either the steps to merge or how many of the newest (last), not both")
    have = sorted(set(available))
    if last is not None:
        if type(last) is not int or last < 1:
            raise ConfigError(f"last must be a positive number of steps, got {last!r}")
        if last > len(have):
            raise MergeError(f"{where} holds {len(have)} step(s) {have}, fewer than the {last} asked for")
        return have[-last:]
    chosen = sorted(set(int(s) for s in steps))  # type: ignore[union-attr]
    if not chosen:
        raise ConfigError("no steps to merge")
    missing = [s for s in chosen if s not in have]
    if missing:
        raise MergeError(f"step(s) {missing} are not in {where} (it holds {have or 'none'})")
    return chosen


def open_durable(durable_dir: str | os.PathLike[str], job: str, steps: Sequence[int] | None = None,
                 last: int | None = None) -> list[StepSource]:
    """The chosen committed steps of `job` under `durable_dir`, opened and verified (oldest first)."""
    from ftd.durable import layout, reader

    root = layout.job_dir(os.path.abspath(durable_dir), job)
    chosen = select_steps(reader.committed_steps(root), steps, last, f"the durable directory {root}")
    sources: list[StepSource] = []
    try:
        for step in chosen:
            sources.append(DurableSource(root, step))
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def open_memory(client: Any, job: str, steps: Sequence[int] | None = None,
                last: int | None = None) -> list[StepSource]:
    """The chosen steps this node's daemon holds for every rank of `job` (`client`: a DaemonClient)."""
    status = client.status()
    held = {r.rank: list(r.sealed_steps) for r in status.ranks}
    chosen = select_steps(held.get(0, []), steps, last, f"this node's memory (rank 0 of job {job!r})")
    sources: list[StepSource] = []
    try:
        for step in chosen:
            sources.append(MemorySource(client, job, step, held))
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


@dataclass
class MergeResult:
    """What a merge did; `to_json()` is the document written beside the outputs."""

    job: str
    source: str  # "durable" or "memory"
    where: str  # the durable job directory, or the daemon's socket
    steps: list[int]
    world_sizes: list[int]
    method: Method
    weights: list[float]
    metric_values: list[float] | None
    include_optim: bool
    averaged: list[str] = field(default_factory=list)  # fqns averaged
    newest: list[str] = field(default_factory=list)  # fqns taken from the newest step (integer, bool, step counters)
    skipped: list[str] = field(default_factory=list)  # fqns left out (the optimizer state, unless include_optim)
    bytes: int = 0
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": SUMMARY_FORMAT, "job": self.job, "source": self.source, "where": self.where,
                "steps": self.steps, "world_sizes": self.world_sizes, **self.method.to_json(),
                "weights": self.weights, "metric_values": self.metric_values, "include_optim": self.include_optim,
                "averaged": len(self.averaged), "newest": self.newest, "skipped": len(self.skipped),
                "bytes": self.bytes, "outputs": self.outputs}


def _averaged(fqn: str, dtype: str) -> bool:
    """Floating and complex tensors are averaged; integer and bool ones and optimizer step counters are not."""
    from ftd.client.segments import torch_dtype

    kind = torch_dtype(dtype)
    if fqn.startswith("optim.") and fqn.endswith(".step"):
        return False
    return kind.is_floating_point or kind.is_complex


def _desc(info: tuple[str, tuple[int, ...]]) -> str:
    return f"{info[0]}{list(info[1])}"


@dataclass
class _Output:
    path: Path  # the final path (a file, or a directory for the DCP format)
    dcp: bool
    names: list[str]  # fqns it holds, in file order
    tmp: Path | None = None
    file: Any = None

    def key(self, fqn: str) -> str:
        return fqn if self.dcp else fqn.removeprefix("model.")

    @property
    def summary_path(self) -> Path:
        if self.dcp:
            return self.path / SUMMARY_FILE
        return self.path.with_name(self.path.name.removesuffix(WEIGHTS_SUFFIX) + ".ftd-merge.json")


def _outputs(out: Any, names: list[str]) -> list[_Output]:
    paths = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if not paths:
        raise ConfigError("give at least one output path")
    outs = []
    for raw in paths:
        path = Path(os.path.abspath(os.fspath(raw)))
        dcp = not path.name.endswith(WEIGHTS_SUFFIX)
        held = names if dcp else [n for n in names if n.startswith("model.")]
        o = _Output(path, dcp, held)
        for p in (o.path, o.summary_path):
            if os.path.lexists(p):
                raise MergeError(f"{p} exists: merge never overwrites; remove it or give another path")
        if not path.parent.is_dir():
            raise MergeError(f"{path.parent} is not a directory")
        outs.append(o)
    if len({o.path for o in outs}) != len(outs):
        raise ConfigError("the same output path is given twice")
    return outs


def merge(sources: Sequence[StepSource], method: Method, out: str | os.PathLike[str] | Sequence[Any], *,
          include_optim: bool = False, job: str = "", source: str = "", where: str = "") -> MergeResult:
    """Merge `sources` (oldest first, as open_durable / open_memory return them) into `out`; see the module."""
    from ftd.durable.safetensors import Tensor, header

    t0 = time.monotonic()
    method.check()
    if not sources:
        raise ConfigError("no steps to merge")
    steps = [s.step for s in sources]
    if steps != sorted(set(steps)):
        raise ConfigError(f"steps must be distinct and oldest first, got {steps}")
    prefixes = ("model.", "optim.") if include_optim else ("model.",)
    first = sources[0]
    names = sorted(n for n in first.tensors if n.startswith(prefixes))
    if not names:
        raise MergeError(f"step {first.step} holds no {' or '.join(prefixes)} tensors")
    for other in sources[1:]:
        theirs = sorted(n for n in other.tensors if n.startswith(prefixes))
        if theirs != names:
            diff = sorted(set(theirs) ^ set(names))
            raise MergeError(f"steps {first.step} and {other.step} hold different tensors: {diff[:3]} "
                             f"({len(diff)} differ)")
        for name in names:
            if other.tensors[name] != first.tensors[name]:
                raise MergeError(f"{name}: step {first.step} holds {_desc(first.tensors[name])}, step "
                                 f"{other.step} {_desc(other.tensors[name])}")
    p, values = weights(method, steps, [s.metrics for s in sources])
    outs = _outputs(out, names)
    result = MergeResult(job, source, where, steps, [s.world_size for s in sources], method, p, values,
                         include_optim, skipped=sorted(n for n in first.tensors if not n.startswith(prefixes)))
    summary = result.to_json()
    total = sum(_nbytes(first.tensors[n]) for n in names)
    try:
        for o in outs:
            specs = [Tensor(o.key(n), first.tensors[n][0], first.tensors[n][1], (0,) * len(first.tensors[n][1]),
                            _nbytes(first.tensors[n])) for n in o.names]
            meta = {"ftd_merge": json.dumps({k: summary[k] for k in ("job", "steps", "method", "weights")},
                                            separators=(",", ":"))}
            head, _ = header(specs, meta, sharding=o.dcp)
            if o.dcp:
                o.tmp = o.path.with_name(f".{o.path.name}.merge-{os.getpid()}.tmp")
                shutil.rmtree(o.tmp, ignore_errors=True)
                o.tmp.mkdir()
                o.file = open(o.tmp / DCP_FILE, "xb")  # noqa: SIM115 - closed below, on success and failure
            else:
                o.tmp = o.path.with_name(f".{o.path.name}.merge-{os.getpid()}.tmp")
                if os.path.lexists(o.tmp):  # left by a merge of an earlier process with this pid
                    o.tmp.unlink()
                o.file = open(o.tmp, "xb")  # noqa: SIM115
            o.file.write(head)
        done, last_log = 0, time.monotonic()
        for i, name in enumerate(names):
            dtype = first.tensors[name][0]
            if _averaged(name, dtype):
                merged = _average(sources, name, method, p)
                result.averaged.append(name)
            else:
                merged = sources[-1].read(name)
                result.newest.append(name)
            data = merged.contiguous().reshape(-1).view(torch.uint8).numpy()
            for o in outs:
                if o.dcp or name.startswith("model."):
                    o.file.write(data)
            done += data.nbytes
            del merged, data
            if time.monotonic() - last_log >= PROGRESS_EVERY_S or i == len(names) - 1:
                last_log = time.monotonic()
                log.info("merge of steps %s (%s): %d/%d tensors, %.1f/%.1f MiB", steps, method.name, i + 1,
                         len(names), done / 2**20, total / 2**20)
        result.bytes = done
        result.outputs = [str(o.path) for o in outs]
        result.seconds = time.monotonic() - t0
        for o in outs:
            o.file.flush()
            os.fsync(o.file.fileno())
            o.file.close()
            o.file = None
            summary_bytes = (json.dumps(result.to_json(), indent=1) + "\n").encode()
            if o.dcp:
                (o.tmp / SUMMARY_FILE).write_bytes(summary_bytes)
                os.replace(o.tmp, o.path)
            else:
                os.replace(o.tmp, o.path)
                o.summary_path.write_bytes(summary_bytes)
    except BaseException as exc:
        for o in outs:
            if o.file is not None:
                o.file.close()
            if o.tmp is not None and os.path.lexists(o.tmp):
                if o.tmp.is_dir():
                    shutil.rmtree(o.tmp, ignore_errors=True)
                else:
                    o.tmp.unlink()
        if isinstance(exc, OSError):  # a source file gone, a full or read-only target
            raise MergeError(f"{exc.filename or 'merge'}: {exc.strerror or exc}") from exc
        raise
    return result


def _nbytes(info: tuple[str, tuple[int, ...]]) -> int:
    from ftd.manifest import itemsize

    return math.prod(info[1]) * itemsize(info[0])


def _average(sources: Sequence[StepSource], name: str, method: Method, p: Sequence[float]) -> torch.Tensor:
    """The float64 (complex128) merge of tensor `name` over the steps, rounded once to its dtype."""
    acc: torch.Tensor | None = None
    d = method.decay
    dtype = None
    for i, src in enumerate(sources):
        x = src.read(name)
        dtype = x.dtype
        x = x.to(torch.complex128 if x.is_complex() else torch.float64)
        if method.name == "ema":
            if acc is None:
                acc = x
            else:
                acc.mul_(d)
                acc.add_(x.mul_(1.0 - d))
        else:
            x.mul_(p[i])
            acc = x if acc is None else acc.add_(x)
        del x
    assert acc is not None and dtype is not None
    return round_once(acc, dtype)


def merge_steps(*, job: str, out: str | os.PathLike[str] | Sequence[Any], durable_dir: str | None = None,
                socket: str | None = None, steps: Sequence[int] | None = None, last: int | None = None,
                method: str = "uniform", decay: float = 0.9, metric: str = "loss", temperature: float = 1.0,
                penalty: float | None = None, maximize: bool = False, include_optim: bool = False) -> MergeResult:
    """Merge `steps` (or the newest `last`) of `job` into `out`: from `durable_dir`, or else from the memory of
    this node's daemon (its `socket`, default the job's). See the module docstring for methods and outputs."""
    how = Method(method, decay, metric, temperature, penalty, maximize)
    how.check()
    if durable_dir:
        from ftd.durable import layout

        sources = open_durable(durable_dir, job, steps, last)
        where, kind = str(layout.job_dir(os.path.abspath(durable_dir), job)), "durable"
        client = None
    else:
        from ftd.client.rpc import DaemonClient
        from ftd.config import ClientConfig

        config = ClientConfig.load(job=job, **({"socket": socket} if socket else {}))
        client = DaemonClient(config.socket, config.job, -1, config.rpc_timeout, config.daemon_user,
                              config.socket_dir_private)
        try:
            sources = open_memory(client, config.job, steps, last)
        except BaseException:
            client.close()
            raise
        where, kind = config.socket, "memory"
    try:
        return merge(sources, how, out, include_optim=include_optim, job=job, source=kind, where=where)
    finally:
        for s in sources:
            s.close()
        if client is not None:
            client.close()


def describe(result: MergeResult) -> str:
    """A few lines for a person (not an API)."""
    lines = [f"merged steps {result.steps} of job {result.job!r} from {result.source} ({result.where}) by "
             f"{result.method.name}: {len(result.averaged)} tensors averaged, {len(result.newest)} taken from step "
             f"{result.steps[-1]}, {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s"]
    lines.append("weights " + ", ".join(f"{s}: {w:.4g}" for s, w in zip(result.steps, result.weights)))
    lines += [f"wrote {path}" for path in result.outputs]
    return "\n".join(lines)


__all__ = ["METHODS", "Method", "MergeResult", "MergeError", "merge", "merge_steps", "open_durable",
           "open_memory", "round_once", "select_steps", "weights"]
