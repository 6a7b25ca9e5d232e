"""What a snapshot holds: capture training state into tensors + JSON meta, and apply it back.

Capture splits the state in two. Parameters and optimizer state stay *live* references: they
do not change until the next `optimizer.step()`, so the copy thread reads them while the next
forward/backward runs. Everything else (buffers, RNG, scheduler, user extra) may change at any
moment and is copied on the caller's thread; it is small. `freeze` does only that (the
Snapshotter's `snapshot()` call); `encode` turns it into entries and JSON meta later, on the copy
thread. `capture` is both at once.

DTensors (FSDP2 `fully_shard`, tensor parallelism) are stored as this rank's local shard
(`to_local()`) and restored into it; their names are listed in `meta["dtensors"]`.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ftd.client import jsonsafe
from ftd.client.segments import torch_dtype
from ftd.client.sharding import full_specs
from ftd.errors import SnapshotCorrupt
from ftd.manifest import EntrySpec, Manifest, itemsize

Extra = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None


@dataclass
class EncodeCache:
    """What `encode` reuses from one step to the next (one per Snapshotter, used by its copy thread alone).

    `specs` hands out the same EntrySpec object for the same entry, so later stages can tell an unchanged
    layout by identity (ftd.client.layoutcache). `optim_key`/`optim` hold the optimizer state's encoding
    while it holds the same tensors (by identity, address, dtype and shape) and the same other values
    under the same keys, for the same named parameters: between two optimizer steps, every time.
    """

    specs: dict[tuple[Any, ...], EntrySpec] = field(default_factory=dict)
    placed: dict[tuple[str, str, bool], tuple[EntrySpec, EntrySpec]] = field(default_factory=dict)
    optim_key: list[Any] | None = None
    optim: tuple[Any, list[tuple[EntrySpec, torch.Tensor, str | None]]] | None = None
    optim_held: list[Any] = field(default_factory=list)
    model_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # state-dict name -> entry name, fqn

    def spec(self, name: str, kind: str, dtype: str, shape: tuple[int, ...]) -> EntrySpec:
        key = (name, kind, dtype, shape)
        spec = self.specs.get(key)
        if spec is None:
            if len(self.specs) > 4096:  # layouts keep changing: start over
                self.specs.clear()
            spec = self.specs[key] = EntrySpec(name, kind, dtype, shape)
        return spec


@dataclass
class Captured:
    """A step's state, ready to lay out: tensor sources by entry name, and the JSON meta."""

    step: int
    specs: list[EntrySpec] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)  # entries read from live tensors (parameters, optimizer state)
    dtensors: set[str] = field(default_factory=set)  # entries that are a DTensor's local shard
    fqns: dict[str, str] = field(default_factory=dict)  # entry -> its checkpoint-wide name (ftd.client.placement)
    dtensor_places: dict[str, DTensorPlace] = field(default_factory=dict)  # entry -> where its shard lies
    metrics: dict[str, float] = field(default_factory=dict)  # recorded in the manifest (Manifest.metrics)
    cache: EncodeCache | None = field(default=None, repr=False)
    _names: set[str] = field(default_factory=set, repr=False)

    def add(self, name: str, kind: str, tensor: torch.Tensor, live: bool = False, fqn: str | None = None) -> None:
        if name in self._names:
            raise ValueError(f"two tensors would be stored as {name!r}")
        self._names.add(name)
        if fqn is not None:
            self.fqns[name] = fqn
        if is_dtensor(tensor):
            place = dtensor_place(tensor)
            if place is not None:
                self.dtensor_places[name] = place
            tensor = tensor.to_local()
            self.dtensors.add(name)
        if live:
            self.live.add(name)
        dtype = str(tensor.dtype).removeprefix("torch.")
        itemsize(dtype)  # unsupported dtypes (quantized, sparse) fail here, at capture
        if tensor.layout is not torch.strided:
            raise TypeError(f"{name}: {tensor.layout} tensors cannot be snapshotted")
        shape = tuple(tensor.shape)
        self.specs.append(self.cache.spec(name, kind, dtype, shape) if self.cache is not None
                          else EntrySpec(name, kind, dtype, shape))
        self.sources.append(tensor)

    def replay(self, added: list[tuple[EntrySpec, torch.Tensor, str | None]]) -> None:
        """Add live entries `add` took for an earlier step again (EncodeCache.optim): same specs, same tensors."""
        for spec, tensor, fqn in added:
            if spec.name in self._names:
                raise ValueError(f"two tensors would be stored as {spec.name!r}")
            self._names.add(spec.name)
            if fqn is not None:
                self.fqns[spec.name] = fqn
            self.live.add(spec.name)
            self.specs.append(spec)
            self.sources.append(tensor)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def capture(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            scheduler: Any | None, extra: Extra) -> Captured:
    """Collect model, optimizer, scheduler, RNG and extra state for `step` (see module docstring)."""
    return encode(freeze(step, model, optimizer, scheduler, extra), model, optimizer)


@dataclass
class Frozen:
    """What `freeze` takes on the caller's thread: the state as of the call, not yet encoded.

    Parameters and optimizer state are live references (unchanged until the next optimizer.step);
    everything else is a copy (jsonsafe.freeze) the trainer can no longer change.
    """

    step: int
    model: list[tuple[str, Any]]  # state-dict order: Parameters live, buffers cloned, extra states frozen
    optim_state: Any = None  # optimizer.state_dict()["state"]: live per-parameter dicts of live tensors (None: no optimizer)
    optim_groups: Any = None  # its param_groups, frozen
    scheduler: Any = None  # its state_dict(), frozen (None: no scheduler)
    extra: Any = None  # dict(extra), frozen (None: no extra)
    rng: dict[str, Any] = field(default_factory=dict)


def freeze(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
           scheduler: Any | None, extra: Extra) -> Frozen:
    """Take on the caller's thread what may change before the next optimizer.step; nothing is encoded here."""
    items: list[tuple[str, Any]] = []
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.nn.Parameter):
            items.append((name, value))
        elif isinstance(value, torch.Tensor):
            items.append((name, value.detach().clone()))
        else:  # a module's get_extra_state()
            items.append((name, jsonsafe.freeze(value)))
    frozen = Frozen(step, items, rng=rng_state())
    if optimizer is not None:
        sd = optimizer.state_dict()
        frozen.optim_state, frozen.optim_groups = sd["state"], jsonsafe.freeze(sd["param_groups"])
    if scheduler is not None:
        frozen.scheduler = jsonsafe.freeze(scheduler.state_dict())
    if extra is not None:
        frozen.extra = jsonsafe.freeze(dict(extra() if callable(extra) else extra))
    return frozen


def encode(frozen: Frozen, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
           cache: EncodeCache | None = None) -> Captured:
    """Turn what `freeze` took into entries and JSON meta (any thread: nothing here reads mutable state
    but the live parameters and optimizer tensors, which hold still until the next optimizer.step).
    With `cache`, what did not change since the previous step is reused (EncodeCache)."""
    cap = Captured(frozen.step, cache=cache)

    def owned(kind: str) -> jsonsafe.TensorSink:  # tensors freeze already copied
        return lambda name, t: cap.add(name, kind, t)

    keys = []
    names = cache.model_names if cache is not None else {}
    for name, value in frozen.model:
        keys.append(name)
        entry, fqn = names.get(name) or names.setdefault(name, (f"model/{name}", "model." + clean_fqn(name)))
        if isinstance(value, torch.nn.Parameter):
            cap.add(entry, "param", value.detach(), live=True, fqn=fqn)
        elif isinstance(value, torch.Tensor):
            cap.add(entry, "buffer", value, fqn=fqn)
        else:
            cap.meta.setdefault("model_extra", {})[name] = jsonsafe.encode(value, f"model/{name}", owned("buffer"))
    cap.meta["model_keys"] = keys
    if frozen.optim_state is not None and optimizer is not None:
        cap.meta["optim"] = {
            "state": _encode_optim_state(cap, frozen, model, optimizer, cache),
            "param_groups": jsonsafe.encode(frozen.optim_groups, "optim/groups", owned("optim")),
        }
    if frozen.scheduler is not None:
        cap.meta["scheduler"] = jsonsafe.encode(frozen.scheduler, "sched", owned("extra"))
    cap.meta["rng"] = encode_rng(frozen.rng, owned("rng"))
    if frozen.extra is not None:
        cap.meta["extra"] = jsonsafe.encode(frozen.extra, "extra", owned("extra"))
    if cap.dtensors:
        cap.meta["dtensors"] = sorted(cap.dtensors)
    cap.meta["step"] = frozen.step
    return cap


def _encode_optim_state(cap: Captured, frozen: Frozen, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        cache: EncodeCache | None) -> Any:
    """The optimizer state's JSON form; its tensors become live entries of `cap` (reused from `cache` when
    the state holds what it held at the previous step)."""
    key, held = _optim_key(frozen) if cache is not None else (None, [])
    if cache is not None and key is not None and key == cache.optim_key and cache.optim is not None:
        encoded, added = cache.optim
        cap.replay(added)
        return encoded
    named = optim_fqns(model, optimizer)
    added: list[tuple[EntrySpec, torch.Tensor, str | None]] = []

    def live_optim(name: str, t: torch.Tensor) -> None:
        fqn = named.get(id(t))
        cap.add(name, "optim", t.detach(), live=True, fqn=fqn)
        added.append((cap.specs[-1], cap.sources[-1], fqn))

    encoded = jsonsafe.encode(frozen.optim_state, "optim/state", live_optim)
    if cache is not None:  # `held` keeps the keyed objects alive, so their ids stay theirs
        cache.optim_key, cache.optim, cache.optim_held = (key, (encoded, added), held) if key is not None \
            else (None, None, [])
    return encoded


_SCALARS = (type(None), bool, int, float, str)


def _optim_key(frozen: Frozen) -> tuple[list[Any] | None, list[Any]]:
    """What the optimizer state's encoding depends on, comparable with ==, and the objects it names by id.

    Every per-parameter value (a plain tensor by identity, address, dtype and shape; a scalar by type and value)
    under its keys, and the model's parameters by name and identity (their names make the entries'
    checkpoint-wide names). None when the state is not a mapping of per-parameter mappings of plain
    tensors and scalars (a DTensor, a nested value): then it is encoded afresh every step.
    """
    held: list[Any] = []
    key: list[Any] = []
    if type(frozen.optim_state) is not dict:
        return None, []
    for name, value in frozen.model:
        if isinstance(value, torch.nn.Parameter):
            key.append((name, id(value)))
            held.append(value)
    for index, per in frozen.optim_state.items():
        if type(per) is not dict:
            return None, []
        for name, value in per.items():
            if type(value) is torch.Tensor:
                key.append((index, name, id(value), value.data_ptr(), value.dtype, value.shape))
                held.append(value)
            elif type(value) in _SCALARS:
                key.append((index, name, type(value), value))
            else:
                return None, []
    return key, held


@dataclass(frozen=True)
class DTensorPlace:
    """A DTensor shard's place in its global tensor, and whether this rank is the one replica that writes it."""

    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    box: tuple[int, ...]
    write: bool


def dtensor_place(tensor: Any) -> DTensorPlace | None:
    """Global shape, offsets and extent of this rank's shard (what DCP records); None for a Partial tensor.

    Of the ranks that hold the same shard (the mesh dimensions it is replicated over) only the one
    at coordinate 0 of each of them writes it.
    """
    placements = tensor.placements
    if any(p.is_partial() for p in placements):
        return None
    chunk = tensor.__create_chunk_list__()[0]
    coord = tensor.device_mesh.get_coordinate() or [0] * len(placements)
    write = all(c == 0 for c, p in zip(coord, placements) if p.is_replicate())
    return DTensorPlace(tuple(tensor.shape), tuple(chunk.offsets), tuple(chunk.sizes), write)


_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    """A state-dict name as torch.distributed.checkpoint's state_dict helpers name it: without DDP's
    leading "module." and the wrapper segments torch.compile, activation checkpointing and FSDP1 add."""
    name = name.removeprefix("module.")
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def optim_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """id(state tensor) -> "optim.state.<parameter name>.<state key>" for every tensor of the optimizer state."""
    names = {id(p): clean_fqn(n) for n, p in model.named_parameters()}
    out: dict[int, str] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                continue
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and isinstance(key, str):
                    out[id(value)] = f"optim.state.{name}.{key}"
    return out


def is_dtensor(value: Any) -> bool:
    """True for a torch.distributed DTensor (without importing that module when nothing uses it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local shard of a DTensor (a view that writes through); any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def rng_state() -> dict[str, Any]:
    """Python `random`, NumPy's global generator (when NumPy is loaded), torch CPU and every CUDA device,
    as fresh values nothing else holds (the getters return copies)."""
    rng: dict[str, Any] = {"python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        rng["numpy"] = np.random.get_state()
    rng["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def encode_rng(rng: Mapping[str, Any], sink: jsonsafe.TensorSink) -> dict[str, Any]:
    """The JSON form of `rng_state()`; its tensors go to `sink`.

    The Mersenne Twister words of Python's and NumPy's generators (624 numbers each) are stored as
    int64 tensors, not JSON numbers: the manifest stays small for every reader. `python_rng` and
    `numpy_rng` read both forms back.
    """
    py = rng["python"]
    if isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], tuple):
        import numpy as np  # a NumPy array of the words converts several times faster than torch.tensor(tuple)

        py = (py[0], torch.from_numpy(np.asarray(py[1], dtype=np.int64)), py[2])
    out = {"python": jsonsafe.encode(py, "rng/python", sink)}
    if "numpy" in rng:
        state = rng["numpy"]
        if isinstance(state, tuple) and len(state) == 5 and hasattr(state[1], "astype"):
            state = (state[0], torch.from_numpy(state[1].astype("int64")), *state[2:])
        out["numpy"] = jsonsafe.encode(state, "rng/numpy", sink)
    sink("rng/torch", rng["torch"])
    out["torch"] = {"__tensor__": "rng/torch"}
    if "cuda" in rng:
        out["cuda"] = jsonsafe.encode(rng["cuda"], "rng/cuda", sink)
    return out


def python_rng(decoded: Any) -> Any:
    """Python's generator state as `random.setstate` takes it, from either stored form (see encode_rng)."""
    if isinstance(decoded, tuple) and len(decoded) == 3 and isinstance(decoded[1], torch.Tensor):
        return (decoded[0], tuple(decoded[1].tolist()), decoded[2])
    return decoded


def numpy_rng(decoded: Any) -> Any:
    """NumPy's global generator state as `set_state` takes it, from either stored form (see encode_rng)."""
    if isinstance(decoded, tuple) and len(decoded) == 5 and isinstance(decoded[1], torch.Tensor):
        import numpy as np

        return (decoded[0], np.asarray(decoded[1].tolist(), dtype=np.uint32), *decoded[2:])
    return decoded


def apply_rng(rng: Mapping[str, Any], source: jsonsafe.TensorSource) -> None:
    """Restore the generators `rng_state` took (in their `encode_rng` form)."""
    random.setstate(python_rng(jsonsafe.decode(rng["python"], source)))
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(numpy_rng(jsonsafe.decode(rng["numpy"], source)))
    torch.set_rng_state(jsonsafe.decode(rng["torch"], source))
    if "cuda" in rng and torch.cuda.is_available():
        states = jsonsafe.decode(rng["cuda"], source)
        if len(states) != torch.cuda.device_count():
            raise SnapshotCorrupt(f"snapshot has RNG state for {len(states)} CUDA devices, "
                                  f"this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(states)


def check_model(manifest: Manifest, model: torch.nn.Module) -> None:
    """Raise SnapshotCorrupt naming the first entry whose name, dtype or shape does not fit `model`.

    A DTensor is compared by its local shard; a sharded entry by its full shape.
    """
    entries = full_specs(manifest)
    model_sd = model.state_dict(keep_vars=True)
    saved = set(manifest.meta.get("model_keys", []))
    missing = [k for k in model_sd if k not in saved]
    if missing or len(saved) != len(model_sd):
        raise SnapshotCorrupt(f"model has entries {missing[:5]} that the snapshot lacks, or the snapshot has "
                              f"{len(saved)} entries for the model's {len(model_sd)}",
                              rank=manifest.rank, step=manifest.step)
    for name, target in model_sd.items():
        if not isinstance(target, torch.Tensor):
            continue
        target = local(target)
        entry = entries.get(f"model/{name}")
        if entry is None:
            raise SnapshotCorrupt("missing from the snapshot", rank=manifest.rank, step=manifest.step, entry=name)
        dtype, shape = entry
        if torch_dtype(dtype) != target.dtype or shape != tuple(target.shape):
            model_dtype = str(target.dtype).removeprefix("torch.")
            raise SnapshotCorrupt(f"snapshot holds {dtype}{list(shape)}, the model has "
                                  f"{model_dtype}{list(target.shape)}", rank=manifest.rank, step=manifest.step,
                                  entry=name)


@dataclass
class _Owned:
    """A tensor the restore allocated for this state alone and filled verified: used as is, not cloned."""

    tensor: torch.Tensor


@dataclass
class _Shard:
    """A stored local shard of a DTensor in the optimizer state, on its way back into a DTensor."""

    tensor: torch.Tensor
    name: str


def live_tensors(manifest: Manifest, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """Entry name -> the live tensor (a DTensor's local shard) that `apply` would copy that entry into.

    Optimizer state is paired by the same keys `apply` uses (parameter id, then state key).
    """
    out = {f"model/{name}": local(value.detach()) for name, value in model.state_dict(keep_vars=True).items()
           if isinstance(value, torch.Tensor)}
    if optimizer is not None and "optim" in manifest.meta:
        _pair(jsonsafe.decode(manifest.meta["optim"]["state"], _Name), optimizer.state_dict()["state"], out)
    return out


class _Name(str):
    """An entry name standing where a tensor will be (see live_tensors)."""


def _pair(saved: Any, live: Any, out: dict[str, torch.Tensor]) -> None:
    if isinstance(saved, _Name):
        if isinstance(live, torch.Tensor):
            out[saved] = local(live)
    elif isinstance(saved, dict) and isinstance(live, dict):
        for key, value in saved.items():
            _pair(value, live.get(key), out)
    elif isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)):
        for value, other in zip(saved, live):
            _pair(value, other, out)


def check_optimizer(manifest: Manifest, optimizer: torch.optim.Optimizer | None) -> None:
    """Raise SnapshotCorrupt when the snapshot's optimizer state cannot load into `optimizer`.

    Checks what `load_state_dict` would refuse half-way or accept wrongly: the number and sizes
    of the parameter groups, state keyed by parameters the groups name, and each saved state
    tensor's shape and dtype against the live state of the same key (when the optimizer has some).
    """
    if optimizer is None:
        return
    meta = manifest.meta

    def corrupt(message: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(message, rank=manifest.rank, step=manifest.step)

    entries = full_specs(manifest)
    try:
        groups = jsonsafe.decode(meta["optim"]["param_groups"], _placeholder)
        saved = [len(g["params"]) for g in groups]
        ids = [i for g in groups for i in g["params"]]
        saved_state = jsonsafe.decode(meta["optim"]["state"], _Name)
    except (KeyError, TypeError, ValueError) as exc:
        raise corrupt(f"snapshot holds no usable optimizer state ({exc!r})") from exc
    live = [len(g["params"]) for g in optimizer.param_groups]
    if saved != live:
        raise corrupt(f"optimizer has parameter groups of sizes {live}, the snapshot {saved}")
    if not isinstance(saved_state, dict) or not all(isinstance(k, (int, str)) for k in saved_state):
        raise corrupt("optimizer state is not a mapping keyed by parameter")
    unknown = [k for k in saved_state if k not in ids]
    if unknown:
        raise corrupt(f"optimizer state for parameters {unknown[:5]} that no parameter group names")
    live_state = optimizer.state_dict()["state"]
    for key, value in saved_state.items():
        if not isinstance(value, dict):
            raise corrupt(f"optimizer state of parameter {key!r} is not a mapping")
        current = live_state.get(key)
        for name, ref in value.items():
            target = current.get(name) if isinstance(current, dict) else None
            if isinstance(ref, _Name) and isinstance(target, torch.Tensor):
                dtype, shape = entries.get(ref, ("?", ()))
                target = local(target)
                if (dtype == "?" or torch_dtype(dtype) != target.dtype or tuple(shape) != tuple(target.shape)) \
                        and target.dim() > 0:
                    raise corrupt(f"optimizer state {key!r}/{name!r}: snapshot holds {dtype}{list(shape)}, "
                                  f"the optimizer {str(target.dtype).removeprefix('torch.')}{list(target.shape)}")


def _placeholder(name: str) -> torch.Tensor:
    return torch.empty(0)


def check_apply(manifest: Manifest, view: Callable[[str], torch.Tensor], model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: Extra,
                restore_rng: bool = True) -> None:
    """Everything `apply` could refuse, checked before it writes anything; SnapshotCorrupt on the first.

    Model and optimizer structure, shapes and dtypes; the scheduler's and extra's state decodable
    into mappings; the RNG states accepted by spare generators. `view` reads unsharded entries
    (the RNG state); nothing is copied out of the segment.
    """
    check_model(manifest, model)
    meta = manifest.meta

    def corrupt(message: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(message, rank=manifest.rank, step=manifest.step)

    if optimizer is not None:
        if not isinstance(meta.get("optim"), dict):
            raise corrupt("snapshot holds no optimizer state")
        check_optimizer(manifest, optimizer)
    try:
        for key, want in (("scheduler", scheduler is not None), ("extra", extra is not None),
                          ("model_extra", True)):
            if want and key in meta and not isinstance(jsonsafe.decode(meta[key], _placeholder), dict):
                raise corrupt(f"snapshot's {key} state is not a mapping")
        if restore_rng:
            if not isinstance(meta.get("rng"), dict):
                raise corrupt("snapshot holds no RNG state")
            _check_rng(meta["rng"], view)
    except SnapshotCorrupt:
        raise
    except Exception as exc:  # a hostile or foreign manifest: anything the decoders or generators refuse
        raise corrupt(f"state cannot be applied: {exc!r}") from exc


def _check_rng(rng: Mapping[str, Any], view: Callable[[str], torch.Tensor]) -> None:
    """Load each captured generator state into a spare generator (the global ones stay untouched)."""
    random.Random().setstate(python_rng(jsonsafe.decode(rng["python"], view)))
    if "numpy" in rng:
        import numpy as np

        np.random.RandomState().set_state(numpy_rng(jsonsafe.decode(rng["numpy"], view)))
    torch.Generator().set_state(jsonsafe.decode(rng["torch"], view).clone())
    if "cuda" in rng and torch.cuda.is_available():
        states = jsonsafe.decode(rng["cuda"], _placeholder)
        if not isinstance(states, list) or len(states) != torch.cuda.device_count():
            raise ValueError(f"snapshot has RNG state for {len(states)} CUDA devices, "
                             f"this process sees {torch.cuda.device_count()}")


def _into_live(saved: Any, live: Any, param: Any = None) -> Any:
    """Replace each segment view in `saved` by its live counterpart (copied into) or by a clone.

    An optimizer that already has state (a restore inside a running process, or after one step)
    gets its tensors overwritten in place instead of new memory being allocated and faulted in.
    A DTensor shard goes into the live DTensor's local tensor, or becomes a DTensor laid out like
    `param` (the parameter this state belongs to) when the optimizer has no state yet.
    """
    if isinstance(saved, _Owned):
        if _fits(live, saved.tensor):
            with torch.no_grad():
                live.copy_(saved.tensor)
            return live
        return saved.tensor
    if isinstance(saved, _Shard):
        if is_dtensor(live) and _fits(local(live), saved.tensor):
            with torch.no_grad():
                local(live).copy_(saved.tensor)
            return live
        if is_dtensor(param) and local(param).shape == saved.tensor.shape:
            from torch.distributed.tensor import DTensor

            value = saved.tensor.to(local(param).device, copy=True)
            return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
        raise SnapshotCorrupt("a DTensor shard of the optimizer state fits neither the live state nor its "
                              "parameter; run one optimizer step before restoring", entry=saved.name)
    if isinstance(saved, torch.Tensor):
        if _fits(live, saved):
            with torch.no_grad():
                live.copy_(saved)
            return live
        return saved.clone()
    if isinstance(saved, dict):
        return {k: _into_live(v, live.get(k) if isinstance(live, dict) else None, param) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        items = [_into_live(v, live[i] if isinstance(live, (list, tuple)) and i < len(live) else None, param)
                 for i, v in enumerate(saved)]
        return type(saved)(items)
    return saved


def _fits(live: Any, saved: torch.Tensor) -> bool:
    return (isinstance(live, torch.Tensor) and not is_dtensor(live) and live.shape == saved.shape
            and live.dtype == saved.dtype and live.layout is torch.strided)


def _params_by_saved_id(groups: Any, optimizer: torch.optim.Optimizer) -> dict[Any, torch.Tensor]:
    """Map the saved state's parameter ids to the live parameters, as load_state_dict pairs them."""
    try:
        ids = [i for g in groups for i in g["params"]]
    except (TypeError, KeyError):
        return {}
    return dict(zip(ids, (p for g in optimizer.param_groups for p in g["params"])))


def apply(manifest: Manifest, view: Callable[[str], torch.Tensor], model: torch.nn.Module,
          optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: Extra,
          restore_rng: bool = True, owned: Collection[str] = ()) -> dict[str, Any] | None:
    """Load a verified snapshot into the live objects; return the decoded `extra` (if any).

    `view(name)` returns a read-only tensor over an entry's bytes in the segment (or, for a sharded
    tensor, the full tensor gathered from the replicas): parameters and buffers are copied straight
    into the model; everything else is cloned out of the segment, but for the optimizer state
    entries named in `owned`, whose view is private memory filled for this apply and is kept as is.
    """
    check_model(manifest, model)
    meta = manifest.meta

    def cloned(name: str) -> torch.Tensor:
        return view(name).clone()

    # the optimizer first: load_state_dict checks the groups before it changes anything
    if optimizer is not None:
        if "optim" not in meta:
            raise SnapshotCorrupt("snapshot holds no optimizer state", rank=manifest.rank, step=manifest.step)
        dtensors = set(meta.get("dtensors", ()))

        def optim_view(name: str) -> Any:
            if name in dtensors:
                return _Shard(view(name), name)
            return _Owned(view(name)) if name in owned else view(name)

        saved = jsonsafe.decode(meta["optim"]["state"], optim_view)
        groups = jsonsafe.decode(meta["optim"]["param_groups"], cloned)
        live, params = optimizer.state_dict()["state"], _params_by_saved_id(groups, optimizer)
        if not isinstance(saved, dict):
            raise SnapshotCorrupt("optimizer state is not a mapping", rank=manifest.rank, step=manifest.step)
        state = {k: _into_live(v, live.get(k), params.get(k)) for k, v in saved.items()}
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise SnapshotCorrupt(f"optimizer state does not fit this optimizer: {exc}",
                                  rank=manifest.rank, step=manifest.step) from exc
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if isinstance(target, torch.Tensor):
                local(target).copy_(view(f"model/{name}"))
    model_extra = meta.get("model_extra", {})
    if model_extra:
        model.load_state_dict({k: jsonsafe.decode(v, cloned) for k, v in model_extra.items()}, strict=False)
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(jsonsafe.decode(meta["scheduler"], cloned))
    if restore_rng:
        apply_rng(meta["rng"], cloned)
    decoded_extra = jsonsafe.decode(meta["extra"], cloned) if "extra" in meta else None
    if decoded_extra is not None and isinstance(extra, dict):
        extra.clear()
        extra.update(decoded_extra)
    return decoded_extra
