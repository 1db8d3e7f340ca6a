"""JSON numbers of v2 responses (``agent.oip.json_numbers``): float32/float16 written with 9
significant digits read back as the same values; NaN, infinity, integers, float64 and BYTES
as Python's json writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeship.agent.oip import json_numbers


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_floats_read_back_as_the_same_values(dtype):
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        arr = (rng.normal(size=20000) * 10.0 ** rng.integers(-40, 40, 20000)).astype(dtype)
    arr = arr[np.isfinite(arr)].reshape(-1, 2)[:5000]
    back = np.array(json.loads(json_numbers(arr)), dtype)
    assert back.shape == (arr.size,) and np.array_equal(back, arr.ravel())
    nonzero = arr.ravel() != 0  # -0 is written "-0", which JSON readers take as 0
    assert back[nonzero].tobytes() == arr.ravel()[nonzero].tobytes()


def test_non_finite_and_other_dtypes_as_json_writes_them():
    assert json_numbers(np.array([[1.5, np.nan], [np.inf, -np.inf]], np.float32)) == \
        "[1.5, NaN, Infinity, -Infinity]"
    assert json_numbers(np.array([0.1, 2.0])) == "[0.1, 2.0]"
    assert json_numbers(np.array([[1, -2]], np.int64)) == "[1, -2]"
    assert json_numbers(np.array([True, False])) == "[true, false]"
    assert json_numbers(np.array([b"a\xff", "b"], dtype=object)) == '["a\\ufffd", "b"]'
