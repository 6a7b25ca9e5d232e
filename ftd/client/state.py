"""What a snapshot holds: capture training state into tensors + JSON meta, and apply it back.

Capture splits the state in two. Parameters and optimizer state stay *live* references: they
do not change until the next `optimizer.step()`, so the copy thread reads them while the next
forward/backward runs. Everything else (buffers, RNG, scheduler, user extra) may change at any
moment and is cloned on the caller's thread; it is small.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ftd.client import jsonsafe
from ftd.errors import SnapshotCorrupt
from ftd.client.segments import torch_dtype
from ftd.manifest import EntrySpec, Manifest, itemsize

Extra = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None


@dataclass
class Captured:
    """A step's state, ready to lay out: tensor sources by entry name, and the JSON meta."""

    step: int
    specs: list[EntrySpec] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set, repr=False)

    def add(self, name: str, kind: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"two tensors would be stored as {name!r}")
        self._names.add(name)
        dtype = str(tensor.dtype).removeprefix("torch.")
        itemsize(dtype)  # unsupported dtypes (quantized, sparse) fail here, at capture
        if tensor.layout is not torch.strided:
            raise TypeError(f"{name}: {tensor.layout} tensors cannot be snapshotted")
        self.specs.append(EntrySpec(name, kind, dtype, tuple(tensor.shape)))
        self.sources.append(tensor)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def capture(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            scheduler: Any | None, extra: Extra) -> Captured:
    """Collect model, optimizer, scheduler, RNG and extra state for `step` (see module docstring)."""
    cap = Captured(step)

    def cloned(kind: str) -> jsonsafe.TensorSink:
        return lambda name, t: cap.add(name, kind, t.detach().clone())

    def live(kind: str) -> jsonsafe.TensorSink:
        return lambda name, t: cap.add(name, kind, t.detach())

    model_sd = model.state_dict(keep_vars=True)
    for name, value in model_sd.items():
        if isinstance(value, torch.nn.Parameter):
            cap.add(f"model/{name}", "param", value.detach())
        elif isinstance(value, torch.Tensor):
            cap.add(f"model/{name}", "buffer", value.detach().clone())
        else:  # a module's get_extra_state()
            cap.meta.setdefault("model_extra", {})[name] = jsonsafe.encode(value, f"model/{name}", cloned("buffer"))
    cap.meta["model_keys"] = list(model_sd)
    if optimizer is not None:
        sd = optimizer.state_dict()
        cap.meta["optim"] = {
            "state": jsonsafe.encode(sd["state"], "optim/state", live("optim")),
            "param_groups": jsonsafe.encode(sd["param_groups"], "optim/groups", cloned("optim")),
        }
    if scheduler is not None:
        cap.meta["scheduler"] = jsonsafe.encode(scheduler.state_dict(), "sched", cloned("extra"))
    cap.meta["rng"] = capture_rng(cloned("rng"))
    if extra is not None:
        values = extra() if callable(extra) else extra
        cap.meta["extra"] = jsonsafe.encode(dict(values), "extra", cloned("extra"))
    cap.meta["step"] = step
    return cap


def capture_rng(sink: jsonsafe.TensorSink) -> dict[str, Any]:
    """Python `random`, NumPy's global generator (when NumPy is loaded), torch CPU and every CUDA device."""
    rng: dict[str, Any] = {"python": jsonsafe.encode(random.getstate(), "rng/python", sink)}
    np = sys.modules.get("numpy")
    if np is not None:
        rng["numpy"] = jsonsafe.encode(np.random.get_state(), "rng/numpy", sink)
    sink("rng/torch", torch.get_rng_state())
    rng["torch"] = {"__tensor__": "rng/torch"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = jsonsafe.encode(torch.cuda.get_rng_state_all(), "rng/cuda", sink)
    return rng


def apply_rng(rng: Mapping[str, Any], source: jsonsafe.TensorSource) -> None:
    """Restore the generators captured by `capture_rng`."""
    random.setstate(jsonsafe.decode(rng["python"], source))
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(jsonsafe.decode(rng["numpy"], source))
    torch.set_rng_state(jsonsafe.decode(rng["torch"], source))
    if "cuda" in rng and torch.cuda.is_available():
        states = jsonsafe.decode(rng["cuda"], source)
        if len(states) != torch.cuda.device_count():
            raise SnapshotCorrupt(f"snapshot has RNG state for {len(states)} CUDA devices, "
                                  f"this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(states)


def check_model(manifest: Manifest, model: torch.nn.Module) -> None:
    """Raise SnapshotCorrupt naming the first entry whose name, dtype or shape does not fit `model`."""
    entries = manifest.entry_map()
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
        entry = entries.get(f"model/{name}")
        if entry is None:
            raise SnapshotCorrupt("missing from the snapshot", rank=manifest.rank, step=manifest.step, entry=name)
        if torch_dtype(entry.dtype) != target.dtype or tuple(entry.shape) != tuple(target.shape):
            model_dtype = str(target.dtype).removeprefix("torch.")
            raise SnapshotCorrupt(f"snapshot holds {entry.dtype}{list(entry.shape)}, the model has "
                                  f"{model_dtype}{list(target.shape)}", rank=manifest.rank, step=manifest.step,
                                  entry=name)


def _into_live(saved: Any, live: Any) -> Any:
    """Replace each segment view in `saved` by its live counterpart (copied into) or by a clone.

    An optimizer that already has state (a restore inside a running process, or after one step)
    gets its tensors overwritten in place instead of new memory being allocated and faulted in.
    """
    if isinstance(saved, torch.Tensor):
        if (isinstance(live, torch.Tensor) and live.shape == saved.shape and live.dtype == saved.dtype
                and live.layout is torch.strided):
            with torch.no_grad():
                live.copy_(saved)
            return live
        return saved.clone()
    if isinstance(saved, dict):
        return {k: _into_live(v, live.get(k) if isinstance(live, dict) else None) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        items = [_into_live(v, live[i] if isinstance(live, (list, tuple)) and i < len(live) else None)
                 for i, v in enumerate(saved)]
        return type(saved)(items)
    return saved


def apply(manifest: Manifest, view: Callable[[str], torch.Tensor], model: torch.nn.Module,
          optimizer: torch.optim.Optimizer | None, scheduler: Any | None, extra: Extra,
          restore_rng: bool = True) -> dict[str, Any] | None:
    """Load a verified snapshot into the live objects; return the decoded `extra` (if any).

    `view(name)` returns a read-only tensor over an entry's bytes in the segment: parameters and
    buffers are copied straight into the model; everything else is cloned out of the segment.
    """
    check_model(manifest, model)
    meta = manifest.meta

    def cloned(name: str) -> torch.Tensor:
        return view(name).clone()

    # the optimizer first: load_state_dict checks the groups before it changes anything
    if optimizer is not None:
        if "optim" not in meta:
            raise SnapshotCorrupt("snapshot holds no optimizer state", rank=manifest.rank, step=manifest.step)
        state = _into_live(jsonsafe.decode(meta["optim"]["state"], view), optimizer.state_dict()["state"])
        groups = jsonsafe.decode(meta["optim"]["param_groups"], cloned)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise SnapshotCorrupt(f"optimizer state does not fit this optimizer: {exc}",
                                  rank=manifest.rank, step=manifest.step) from exc
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if isinstance(target, torch.Tensor):
                target.copy_(view(f"model/{name}"))
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
