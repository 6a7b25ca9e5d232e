"""ftd.client.jsonsafe: exact round trips of non-tensor state through JSON, without pickle."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from ftd.client import jsonsafe


class _Store:
    """A tensor sink/source pair that records what was handed over."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: list[str] = []

    def sink(self, name: str, tensor: torch.Tensor) -> None:
        self.names.append(name)
        self.tensors[name] = tensor.clone()

    def source(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _round_trip(value, store: _Store | None = None):
    store = store or _Store()
    encoded = jsonsafe.encode(value, "x", store.sink)
    # through real JSON text, as the manifest does
    text = json.dumps(encoded, allow_nan=True)
    return jsonsafe.decode(json.loads(text), store.source)


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _same(a, b) -> bool:
    """Deep equality that also demands equal types and bit-equal floats."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return _bits(a) == _bits(b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                                                          b.view(torch.uint8) if b.numel() else b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


# ---- scalars ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, True, False, 0, -1, 7, 2**63 - 1, -(2**63), 2**64, 3**200, -(7**150),
                                   "", "text", "ünïcødé ✓", "__tuple__", "a/b"])
def test_scalar_round_trip(value):
    back = _round_trip(value)
    assert _same(value, back), (value, back)


def test_bool_stays_bool_and_int_stays_int():
    back = _round_trip([True, 1, False, 0])
    assert [type(v) for v in back] == [bool, int, bool, int]


@pytest.mark.parametrize("value", [0.0, 1.5, -2.25, 1e-310, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3,
                                   float("inf"), float("-inf")])
def test_float_round_trip_bit_exact(value):
    back = _round_trip(value)
    assert isinstance(back, float)
    assert _bits(back) == _bits(value)


def test_negative_zero_keeps_its_sign():
    back = _round_trip(-0.0)
    assert back == 0.0 and math.copysign(1.0, back) == -1.0
    assert _bits(back) == _bits(-0.0)
    back = _round_trip(0.0)
    assert math.copysign(1.0, back) == 1.0


def test_nan_round_trip():
    back = _round_trip({"n": float("nan"), "l": [float("nan"), -0.0, float("-inf")]})
    assert math.isnan(back["n"])
    assert math.isnan(back["l"][0])
    assert math.copysign(1.0, back["l"][1]) == -1.0
    assert back["l"][2] == float("-inf")


def test_int_subclass_becomes_int():
    import enum

    class Color(enum.IntEnum):
        RED = 3

    back = _round_trip(Color.RED)
    assert back == 3 and type(back) is int


# ---- containers -------------------------------------------------------------------------------


def test_nested_containers_round_trip():
    value = {
        "list": [1, [2, [3, []]], (), (4,)],
        "tuple": (1, (2.5, "s"), [None, (True,)]),
        "dict": {"a": {"b": {"c": ()}}},
        "empty": {},
    }
    back = _round_trip(value)
    assert _same(value, back), back


def test_list_and_tuple_are_distinguished():
    back = _round_trip([[1, 2], (1, 2), [(1, 2)], ((1, 2),)])
    assert type(back[0]) is list and type(back[1]) is tuple
    assert type(back[2][0]) is tuple and type(back[3]) is tuple and type(back[3][0]) is tuple


def test_int_tuple_and_mixed_keys():
    value = {0: "zero", 1: {2: [3]}, (1, 2): "pair", ((1,), "a"): "nested", None: 5, True: "t", -3: 1.5, "s": 2}
    back = _round_trip(value)
    assert _same(value, back), back
    assert list(back) == list(value)  # order kept
    assert type(next(iter(back))) is int


def test_float_keys():
    value = {1.5: "a", -0.0: "b", float("inf"): "c"}
    back = _round_trip(value)
    assert _same(value, back)
    assert math.copysign(1.0, list(back)[1]) == -1.0


@pytest.mark.parametrize("marker", ["__tuple__", "__dict__", "__tensor__", "__ndarray__", "__npscalar__"])
def test_keys_colliding_with_markers(marker):
    payloads = {"__tuple__": [1, 2], "__dict__": [[1, 2]], "__tensor__": "extra/t",
                "__ndarray__": {"dtype": "<f4", "shape": [1], "data": [1.0]},
                "__npscalar__": {"dtype": "<i8", "value": 1}}
    single = {marker: payloads[marker]}
    back = _round_trip(single)
    assert _same(single, back), back
    several = {marker: payloads[marker], "other": (1,)}
    back = _round_trip(several)
    assert _same(several, back), back
    nested = [{"k": {marker: payloads[marker]}}]
    assert _same(nested, _round_trip(nested))


def test_decoded_dicts_are_fresh_objects():
    inner = {"a": [1]}
    back = _round_trip({"x": inner})
    assert back["x"] == inner and back["x"] is not inner


# ---- numpy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], dtype=np.float32),
    np.array([1.1, -0.0, np.nan], dtype=np.float64),
    np.array([0.333, 65504.0, -0.0], dtype=np.float16),
    np.array([2**64 - 1, 0], dtype=np.uint64),
    np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    np.arange(24, dtype=np.int8).reshape(2, 3, 4),
    np.array([True, False]),
    np.zeros((0, 3), dtype=np.int32),
    np.array(5.5),
    np.arange(10, dtype=">i4"),
    np.arange(20, dtype=np.float64).reshape(4, 5).T,  # non-contiguous
])
def test_numpy_array_round_trip(array):
    back = _round_trip({"a": array})["a"]
    assert isinstance(back, np.ndarray)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.ascontiguousarray(back).tobytes() == np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize("scalar", [np.int64(-5), np.uint32(4000000000), np.int8(-128), np.float32(1 / 3),
                                    np.float16(-0.0), np.float32(np.nan), np.bool_(True), np.uint64(2**64 - 1)])
def test_numpy_scalar_round_trip(scalar):
    back = _round_trip([scalar])[0]
    assert type(back) is type(scalar)
    assert back.tobytes() == scalar.tobytes()


def test_numpy_float64_scalar_keeps_value():
    # np.float64 subclasses float, so it travels as a plain float: value and bits are kept
    back = _round_trip(np.float64(-0.0))
    assert _bits(float(back)) == _bits(-0.0)


def test_numpy_rng_state_round_trip():
    state = np.random.RandomState(3).get_state()
    back = _round_trip(state)
    assert isinstance(back, tuple) and back[0] == "MT19937"
    assert back[1].dtype == state[1].dtype and np.array_equal(back[1], state[1])
    assert back[2:] == state[2:]
    rs = np.random.RandomState()
    rs.set_state(back)
    assert np.array_equal(rs.rand(5), np.random.RandomState(3).rand(5))


@pytest.mark.parametrize("array", [np.array(["a"]), np.array([1 + 2j]), np.array([object()], dtype=object)])
def test_unsupported_numpy_arrays_raise(array):
    with pytest.raises(TypeError, match=r"x/k"):
        jsonsafe.encode({"k": array}, "x", _Store().sink)


@pytest.mark.parametrize("scalar", [np.complex64(1 + 2j), np.datetime64("2024-01-01")])
def test_unsupported_numpy_scalars_raise(scalar):
    with pytest.raises(TypeError, match=r"x/k"):
        encoded = jsonsafe.encode({"k": scalar}, "x", _Store().sink)
        json.dumps(encoded, allow_nan=True)


# ---- tensors ----------------------------------------------------------------------------------


def test_tensors_go_through_sink_and_source():
    store = _Store()
    t1 = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    t2 = torch.tensor(7, dtype=torch.int64)
    value = {"a": t1, "b": [t2, (t1[0],)], 3: {"deep": t2}}
    encoded = jsonsafe.encode(value, "extra", store.sink)
    assert set(store.names) == set(store.tensors)
    assert len(store.names) == 4 and len(set(store.names)) == 4
    assert "extra/#v0" in store.names and "extra/#v1/0" in store.names  # int key 3: the indexed dict form
    assert "__tensor__" in json.dumps(encoded)
    back = jsonsafe.decode(json.loads(json.dumps(encoded)), store.source)
    assert torch.equal(back["a"], t1) and torch.equal(back["b"][0], t2)
    assert isinstance(back["b"][1], tuple) and torch.equal(back["b"][1][0], t1[0])
    assert torch.equal(back[3]["deep"], t2)


def test_tensor_as_dict_value_with_tuple_key():
    store = _Store()
    value = {(0, "w"): torch.ones(2)}
    back = _round_trip(value, store)
    assert list(back) == [(0, "w")]
    assert torch.equal(back[(0, "w")], torch.ones(2))


@pytest.mark.parametrize("value", [{"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}},
                                   {1: torch.zeros(1), "1": torch.ones(1)}])
def test_tensor_names_are_unique(value):
    store = _Store()
    jsonsafe.encode(value, "extra", store.sink)
    assert len(store.names) == 2
    assert len(set(store.names)) == 2, store.names


# ---- unsupported values -----------------------------------------------------------------------


@pytest.mark.parametrize("value,path", [
    (object(), "x"),
    ({"a": [1, 2, {3, 4}]}, "x/a/2"),
    ({"a": {"b": (1, b"bytes")}}, "x/a/b/1"),
    ([1 + 2j], "x/0"),
    ({"f": lambda: 0}, "x/f"),
    ({frozenset([1]): 2}, "x/#k0"),
])
def test_unsupported_types_raise_type_error_naming_the_path(value, path):
    with pytest.raises(TypeError) as err:
        jsonsafe.encode(value, "x", _Store().sink)
    assert str(err.value).startswith(f"{path}:"), str(err.value)


def test_unsupported_type_message_names_the_type():
    class Opaque:
        pass

    with pytest.raises(TypeError, match="Opaque"):
        jsonsafe.encode({"o": Opaque()}, "extra", _Store().sink)


# ---- nesting bounds ---------------------------------------------------------------------------


def _nested(depth: int, kind: str):
    value = 1
    for _ in range(depth):
        value = {"k": value} if kind == "dict" else ([value] if kind == "list" else (value,))
    return value


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
def test_encode_refuses_values_deeper_than_the_bound_without_recursion_error(kind):
    store = _Store()
    jsonsafe.encode(_nested(jsonsafe.MAX_DEPTH // 2 - 1, kind), "x", store.sink)
    with pytest.raises(ValueError, match="nested deeper"):
        jsonsafe.encode(_nested(5000, kind), "x", store.sink)


def test_encode_refuses_a_cycle():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="or a cycle"):
        jsonsafe.encode(cycle, "x", _Store().sink)


def test_encoded_values_fit_in_a_manifest():
    """The deepest value encode accepts stays within the manifest's parse bound (meta adds 4 levels)."""
    from ftd.manifest import MAX_JSON_DEPTH, json_depth

    for kind in ("dict", "list", "tuple"):
        for depth in range(1, 200):
            try:
                out = jsonsafe.encode(_nested(depth, kind), "x", _Store().sink)
            except ValueError:
                break
            assert json_depth({"meta": {"optim": {"state": out}}}) <= MAX_JSON_DEPTH


def test_decode_refuses_deep_values_and_bad_dict_items():
    from ftd.errors import ManifestError

    with pytest.raises(ManifestError, match="nested deeper"):
        jsonsafe.decode(_nested(200, "list"), _Store().source)
    with pytest.raises(ManifestError, match="key, value"):
        jsonsafe.decode({"__dict__": [[1, 2, 3]]}, _Store().source)
