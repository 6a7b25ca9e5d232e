"""Turn the non-tensor parts of training state into JSON-safe values and back, without pickle.

Supported: None, bool, int, float (NaN, ±inf and -0.0 round-trip exactly), str, list, tuple,
dict (any keys of these types), NumPy arrays and scalars, and tensors. A tensor is replaced by
`{"__tensor__": name}` and handed to a callback that stores it as a manifest entry.
Anything else raises TypeError naming where it was found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TensorSink = Callable[[str, torch.Tensor], None]
TensorSource = Callable[[str], torch.Tensor]
_MARKERS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__", "__npscalar__")


def encode(value: Any, path: str, sink: TensorSink) -> Any:
    """Return a JSON-safe form of `value`; tensors go to `sink(path, tensor)`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        sink(path, value)
        return {"__tensor__": path}
    if isinstance(value, list):
        return [encode(v, f"{path}/{i}", sink) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{path}/{i}", sink) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: encode(v, f"{path}/{_escape(k)}", sink) for k, v in value.items()}
        return {"__dict__": [[encode(k, f"{path}/#k{i}", sink), encode(v, f"{path}/#v{i}", sink)]
                             for i, (k, v) in enumerate(value.items())]}
    np = _numpy()
    if np is not None and isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{path}: numpy arrays of dtype {value.dtype} are not supported")
        return {"__ndarray__": {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}}
    if np is not None and isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{path}: numpy scalars of dtype {value.dtype} are not supported")
        return {"__npscalar__": {"dtype": value.dtype.str, "value": value.item()}}
    raise TypeError(f"{path}: values of type {type(value).__name__} cannot be snapshotted "
                    "(use JSON-safe values or tensors)")


def _escape(key: str) -> str:
    """Make a dict key safe as one component of an entry name ('/' separates, '#' marks indices)."""
    return key.replace("%", "%25").replace("/", "%2F").replace("#", "%23")


def decode(value: Any, source: TensorSource) -> Any:
    """Invert `encode`; tensors are fetched with `source(name)`."""
    if isinstance(value, list):
        return [decode(v, source) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, inner), = value.items()
        if key == "__tuple__" and isinstance(inner, list):
            return tuple(decode(v, source) for v in inner)
        if key == "__dict__" and isinstance(inner, list):
            return {_hashable(decode(k, source)): decode(v, source) for k, v in inner}
        if key == "__tensor__" and isinstance(inner, str):
            return source(inner)
        if key == "__ndarray__" and isinstance(inner, dict):
            np = _require_numpy()
            return np.asarray(inner["data"], dtype=np.dtype(inner["dtype"])).reshape(inner["shape"])
        if key == "__npscalar__" and isinstance(inner, dict):
            np = _require_numpy()
            return np.dtype(inner["dtype"]).type(inner["value"])
    return {k: decode(v, source) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise ValueError("a dict key decoded to a list")
    return key


def _numpy() -> Any:
    import sys

    return sys.modules.get("numpy")


def _require_numpy() -> Any:
    import numpy

    return numpy

