"""agent.jsonarray: arrays of numbers cut out of large JSON bodies and parsed into the
tensor's dtype give exactly what json.loads + NumPy give, and refuse what they refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeship.agent import jsonarray
from edgeship.agent.jsonarray import JsonTensorError, NumberArray, as_array, loads


@pytest.fixture(autouse=True)
def lift_everything(monkeypatch):
    """Every array of numbers goes through the vectorised path, whatever its size."""
    monkeypatch.setattr(jsonarray, "SMALL_BODY_BYTES", 0)
    monkeypatch.setattr(jsonarray, "LIFT_MIN_CHARS", 2)


shapes = st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, kind=st.sampled_from(["float32", "float64", "int64", "int8", "bool"]),
       seed=st.integers(0, 2**32 - 1))
def test_regular_arrays_parse_like_json_and_numpy(shape, kind, seed):
    rng = np.random.default_rng(seed)
    if kind.startswith("float"):
        arr = rng.normal(size=shape) * 10.0 ** rng.integers(-5, 5)
    elif kind == "bool":
        arr = rng.integers(0, 2, size=shape)
    else:
        info = np.iinfo(kind)
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True)
    text = json.dumps({"t": arr.tolist(), "s": "[1, 2]"}, indent=int(seed % 3) or None)
    doc = loads(text.encode())
    assert doc["s"] == "[1, 2]"
    got = as_array(doc["t"], np.dtype(kind), "t")
    want = np.asarray(json.loads(text)["t"]).astype(kind)  # (0, 4) reads back as (0,)
    assert got.dtype == np.dtype(kind) and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


RAGGED = ["[[1, 2], [3]]", "[[1], [[2]]]", "[[1, 2], 3]", "[1, [2]]", "[[[1]], []]",
          "[1 2]", "[1,, 2]", "[1, 2,]", "[,1]", "[1.5.2]", "[1e]", "[[1] [2]]", "[-]"]


@pytest.mark.parametrize("text", RAGGED)
def test_ragged_or_malformed_arrays_are_refused_like_numpy(text):
    body = ('{"t": ' + text + "}").encode()
    try:
        value = loads(body)["t"]
    except JsonTensorError:
        return  # malformed JSON: refused by the parser itself
    assert isinstance(value, NumberArray) or isinstance(value, list)
    with pytest.raises(JsonTensorError):
        as_array(value, np.dtype("float32"), "t")


@pytest.mark.parametrize("text,dtype", [("[1.5, 2]", "int64"), ("[1e3]", "int32"),
                                        ("[300]", "uint8"), ("[-1]", "uint16"),
                                        ("[2]", "bool"), ("[9223372036854775808]", "int64"),
                                        ("[" + "9" * 5000 + "]", "int64")])
def test_integer_inputs_take_integers_in_range_only(text, dtype):
    value = loads(('{"t": ' + text + "}").encode())["t"]
    with pytest.raises(JsonTensorError):
        as_array(value, np.dtype(dtype), "t")


def test_json_left_besides_numbers_is_bounded(monkeypatch):
    body = b'{"t": [' + b",".join([b'{"a": 1}'] * 40_000) + b"]}"
    with pytest.raises(JsonTensorError) as err:
        loads(body)
    assert err.value.too_large


def test_a_nonce_key_cannot_be_forged():
    body = b'{"t": [1, 2, 3], "u": {"\\u0000fake": 0}}'
    doc = loads(body)
    assert doc["u"] == {"\x00fake": 0} and isinstance(doc["t"], NumberArray)
