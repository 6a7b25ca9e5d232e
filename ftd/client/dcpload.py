"""Loading ftd's pieces of global tensors onto any world size through DCP's load planning.

Both reshard paths — from the durable tier (ftd.client.reshard) and from the daemons' memory
(ftd.client.memreshard) — hand `torch.distributed.checkpoint.load` a `PieceReader`: a
StorageReader whose metadata is the old world's global tensors and the boxes (pieces) that tile
them, from the manifests' placements. DCP's planner decides which parts of which pieces this
rank's state dict needs (its DTensor shards, or whole tensors); the reader reads just the
elements those parts span, verified, and copies them into place.

Per-rank state (RNG streams, scheduler, param groups, `extra`) has no global meaning. The rule,
the same for both paths: new rank r takes old rank r's, or old rank 0's when r did not exist; a
script that needs another rule for `extra` passes `reshard_extra=` to the Snapshotter (called
with every old rank's `extra`, it returns this rank's).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ftd.client import jsonsafe, state
from ftd.client.segments import torch_dtype
from ftd.errors import FtdError
from ftd.manifest import Manifest

Box = tuple[int, ...]
Globals = dict[str, tuple[str, Box, list[tuple[Box, Box]]]]
"""fqn -> (dtype name, global shape, [(offsets, box) of every piece])."""
ReshardExtra = Callable[[list[dict[str, Any]]], dict[str, Any]]
PREFETCH_BYTES = 256 << 20
"""Bytes of pieces a reader is asked to fetch together (`PieceReader.prefetch`), at most about."""


def strides(box: Box) -> tuple[int, ...]:
    """Row-major element strides of a contiguous tensor of shape `box`."""
    out, acc = [], 1
    for n in reversed(box):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def element_span(box: Box, offsets: Box, lengths: Box) -> tuple[int, int]:
    """[first, end) element indices, in a contiguous piece of shape `box`, of its sub-box at `offsets`."""
    st = strides(box)
    if any(n == 0 for n in lengths):
        return 0, 0
    first = sum(o * s for o, s in zip(offsets, st))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, st))
    return first, last + 1


class PieceReader(StorageReader):
    """A DCP StorageReader over ftd's pieces; a subclass reads (and verifies) a piece's elements."""

    def __init__(self, globals_: Globals):
        super().__init__()
        self.globals = globals_
        self.bytes_read = 0

    def read_elements(self, fqn: str, offsets: Box, first: int, end: int) -> tuple[torch.Tensor, int]:
        """(flat tensor of the piece's dtype, index of its first element) holding at least elements
        [first, end) of the piece at `offsets`, every byte verified."""
        raise NotImplementedError

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md: dict[str, Any] = {}
        for fqn, (dtype, shape, pieces) in self.globals.items():
            md[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype(dtype)), torch.Size(shape),
                                            [ChunkStorageMetadata(torch.Size(o), torch.Size(b)) for o, b in pieces])
        return Metadata(state_dict_metadata=md, storage_meta=StorageMeta())

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _box(self, fqn: str, offsets: Box) -> Box:
        for o, b in self.globals[fqn][2]:
            if o == offsets:
                return b
        raise KeyError(f"{fqn}: no piece at {list(offsets)}")

    def prefetch(self, wanted: list[tuple[str, Box, int, int]]) -> None:
        """About to read these (fqn, offsets, first, end) element spans: a reader may fetch them together."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        groups: dict[tuple[str, Box], list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            groups[(item.storage_index.fqn, tuple(item.storage_index.offset or ()))].append(item)
        planned = []
        for (fqn, offsets), items in groups.items():
            box = self._box(fqn, offsets)
            spans = [element_span(box, tuple(i.storage_offsets), tuple(i.lengths)) for i in items]
            planned.append((fqn, offsets, box, items, spans, min(s[0] for s in spans), max(s[1] for s in spans)))
        window: list = []
        window_bytes = 0
        for i, group in enumerate(planned):
            window.append(group)
            window_bytes += (group[6] - group[5]) * torch_dtype(self.globals[group[0]][0]).itemsize
            if window_bytes < PREFETCH_BYTES and i + 1 < len(planned):
                continue
            self.prefetch([(fqn, offsets, first, end) for fqn, offsets, _, _, _, first, end in window])
            for fqn, offsets, box, items, spans, first, end in window:
                flat, base = self.read_elements(fqn, offsets, first, end)
                st = strides(box)
                for item, (start, stop) in zip(items, spans):
                    target = planner.resolve_tensor(item).detach()
                    if stop > start:
                        target.copy_(flat.as_strided(tuple(item.lengths), st, start - base))
                    planner.commit_tensor(item, target)
            window, window_bytes = [], 0
        future: Future[None] = Future()
        future.set_result(None)
        return future


class StateDicts:
    """This rank's model and optimizer state dicts as DCP names them (made once: making the optimizer's
    initialises its state with a step, which costs as much as a training step)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self.model, self.optimizer = model, optimizer
        self.msd = get_model_state_dict(model)
        self.osd = get_optimizer_state_dict(model, optimizer) if optimizer is not None else None


def check_target(globals_: Globals, dicts: StateDicts) -> None:
    """Every tensor of the live state dicts has a global of the same dtype and shape (before anything is written)."""
    from torch.distributed.tensor import DTensor

    def check(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                check(f"{prefix}.{k}", v)
            return
        if not isinstance(value, torch.Tensor):
            return
        g = globals_.get(prefix)
        shape = tuple(value.shape)  # a DTensor's shape is its global shape
        dtype = (value.to_local() if isinstance(value, DTensor) else value).dtype
        if g is None:
            raise ValueError(f"{prefix} is not in the step being resharded")
        if torch_dtype(g[0]) != dtype or tuple(g[1]) != shape:
            raise ValueError(f"{prefix}: the step holds {g[0]}{list(g[1])}, this rank's model "
                             f"{str(dtype).removeprefix('torch.')}{list(shape)}")

    for k, v in dicts.msd.items():
        check(f"model.{k}", v)
    if dicts.osd is not None:
        for k, v in dicts.osd["state"].items():
            check(f"optim.state.{k}", v)


def load_tensors(reader: PieceReader, dicts: StateDicts) -> None:
    """Model and optimizer tensors of this rank's state dicts from `reader`, through DCP's planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model, optimizer, msd, osd = dicts.model, dicts.optimizer, dicts.msd, dicts.osd
    target: dict[str, Any] = {"model": msd}
    if osd is not None:
        target["optim"] = {"state": osd["state"]}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(target, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    except CheckpointException as exc:  # a BaseException: it must not get past the callers' `except Exception`
        raise LoadFailed(_first_failure(exc)) from None
    set_model_state_dict(model, msd)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd)


class LoadFailed(FtdError):
    """DCP's load failed on some rank (the first rank's reason)."""


def _first_failure(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None) or {}
    for rank, wrapped in sorted(failures.items()):
        inner = getattr(wrapped, "exc", wrapped)
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return str(exc)


def apply_small_state(manifest: Manifest, raw: Callable[[str], torch.Tensor],
                      optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: state.Extra,
                      restore_rng: bool, hook_extra: Callable[[], dict[str, Any]] | None
                      ) -> dict[str, Any] | None:
    """The per-rank state of `manifest` (one old rank's): param groups, scheduler, RNG, `extra`.

    `raw(name)` is that rank's verified entry `name` (a fresh tensor); `hook_extra`, when the script
    gave `reshard_extra`, returns this rank's `extra` (the hook applied to every old rank's).
    """
    meta = manifest.meta
    if optimizer is not None and "optim" in meta:
        groups = jsonsafe.decode(meta["optim"]["param_groups"], raw)
        for group, saved in zip(optimizer.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(jsonsafe.decode(meta["scheduler"], raw))
    if restore_rng and "rng" in meta:
        state.apply_rng(meta["rng"], raw)
    decoded = jsonsafe.decode(meta["extra"], raw) if "extra" in meta else None
    if hook_extra is not None:
        decoded = hook_extra()
    if isinstance(decoded, dict) and isinstance(extra, dict):
        extra.clear()
        extra.update(decoded)
    return decoded


def tiles(pieces: list[tuple[Box, Box]], shape: Box) -> bool:
    """Whether the pieces cover every element of `shape` exactly once."""
    if sum(math.prod(b) for _, b in pieces) != math.prod(shape):
        return False
    ordered = sorted(pieces)
    for i, (ao, ab) in enumerate(ordered):
        if any(o < 0 or o + b > n for o, b, n in zip(ao, ab, shape)):
            return False
        for bo, bb in ordered[i + 1:]:
            if bo and bo[0] >= ao[0] + ab[0]:
                break
            if all(y < x + xb and x < y + yb for x, xb, y, yb in zip(ao, ab, bo, bb)):
                return False
    return True
