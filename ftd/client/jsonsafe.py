"""Turn the non-tensor parts of training state into JSON-safe values and back, without pickle.

Supported: None, bool, int, float (NaN, ±inf and -0.0 round-trip exactly), str, list, tuple,
dict (any keys of these types), NumPy arrays and scalars, and tensors. A tensor is replaced by
`{"__tensor__": name}` and handed to a callback that stores it as a manifest entry.
Anything else raises TypeError naming where it was found; a value nested deeper than
MAX_DEPTH JSON levels (a cycle included) raises ValueError, so a manifest stays within the
nesting bound every parser enforces (ftd.manifest.MAX_JSON_DEPTH) and no RecursionError
reaches the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ftd.errors import ManifestError
from ftd.manifest import MAX_JSON_DEPTH

TensorSink = Callable[[str, torch.Tensor], None]
TensorSource = Callable[[str], torch.Tensor]
_MARKERS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__", "__npscalar__")
MAX_DEPTH = 48  # JSON levels of one encoded value; a manifest adds a few above it (limit 64)


def encode(value: Any, path: str, sink: TensorSink, _depth: int = 0) -> Any:
    """Return a JSON-safe form of `value`; tensors go to `sink(path, tensor)`."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels (or a cycle)")
    d = _depth + 1
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
        return [encode(v, f"{path}/{i}", sink, d) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{path}/{i}", sink, d + 1) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: encode(v, f"{path}/{_escape(k)}", sink, d) for k, v in value.items()}
        return {"__dict__": [[encode(k, f"{path}/#k{i}", sink, d + 3), encode(v, f"{path}/#v{i}", sink, d + 3)]
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


def freeze(value: Any, _depth: int = 0) -> Any:
    """A copy of `value` that later changes to it cannot reach: containers copied, tensors cloned, arrays copied.

    For values `encode` will take later (on another thread): scalars and strings are immutable and
    shared; lists, tuples and dicts (subclasses become the plain type, which `encode` stores alike)
    are rebuilt; tensors are detached clones. Anything else, and anything nested deeper than
    MAX_DEPTH (a cycle included), is returned as it is: `encode` refuses it with the error it
    always gave. Never raises for a value `encode` accepts.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _depth > MAX_DEPTH:
        return value
    d = _depth + 1
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [freeze(v, d) for v in value]
    if isinstance(value, tuple):
        return tuple([freeze(v, d) for v in value])
    if isinstance(value, dict):
        return {freeze(k, d): freeze(v, d) for k, v in value.items()}
    np = _numpy()
    if np is not None and isinstance(value, np.ndarray):
        return value.copy()
    return value


def _escape(key: str) -> str:
    """Make a dict key safe as one component of an entry name ('/' separates, '#' marks indices)."""
    return key.replace("%", "%25").replace("/", "%2F").replace("#", "%23")


def decode(value: Any, source: TensorSource, _depth: int = 0) -> Any:
    """Invert `encode`; tensors are fetched with `source(name)`.

    ManifestError for a value nested deeper than a manifest may be (ftd.manifest.MAX_JSON_DEPTH).
    """
    if _depth > MAX_JSON_DEPTH:
        raise ManifestError(f"a snapshot value is nested deeper than {MAX_JSON_DEPTH} levels")
    d = _depth + 1
    if isinstance(value, list):
        return [decode(v, source, d) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, inner), = value.items()
        if key == "__tuple__" and isinstance(inner, list):
            return tuple(decode(v, source, d) for v in inner)
        if key == "__dict__" and isinstance(inner, list):
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in inner):
                raise ManifestError("a __dict__ item is not a [key, value] pair")
            return {_hashable(decode(k, source, d)): decode(v, source, d) for k, v in inner}
        if key == "__tensor__" and isinstance(inner, str):
            return source(inner)
        if key == "__ndarray__" and isinstance(inner, dict):
            np = _require_numpy()
            return np.asarray(inner["data"], dtype=np.dtype(inner["dtype"])).reshape(inner["shape"])
        if key == "__npscalar__" and isinstance(inner, dict):
            np = _require_numpy()
            return np.dtype(inner["dtype"]).type(inner["value"])
    return {k: decode(v, source, d) for k, v in value.items()}


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

