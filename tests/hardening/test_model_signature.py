"""The health check compares the manifest's declared inputs and outputs with the model's
real ones: a release that declares [N,1,8,9] for an 8x8 model (or the wrong names or
dtypes) is refused before it serves, and the device keeps its version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeship.agent.manifest import TensorSpec
from edgeship.agent.signature import IOSpec, signature_mismatches
from tests.support import models
from tests.support.loop_env import Fleet, predict


def T(name, dtype, *shape):
    return TensorSpec(name, dtype, tuple(shape))


def S(name, dtype, *shape):
    return IOSpec(name, dtype, tuple(shape))


ACTUAL = ((S("x", "float32", None, 1, 8, 8),), (S("y", "float32", None, 10),))


@pytest.mark.parametrize("declared,fragment", [
    (((T("x", "float32", None, 1, 8, 9),), (T("y", "float32", None, 10),)), "[N, 1, 8, 9]"),
    (((T("x", "float32", None, 64),), (T("y", "float32", None, 10),)), "rank"),
    (((T("image", "float32", None, 1, 8, 8),), (T("y", "float32", None, 10),)), "'image'"),
    (((T("x", "int64", None, 1, 8, 8),), (T("y", "float32", None, 10),)), "int64"),
    (((T("x", "float32", None, 1, 8, 8),), (T("y", "float32", None, 11),)), "output"),
    (((T("x", "float32", None, 1, 8, 8), T("z", "float32", 3)),
      (T("y", "float32", None, 10),)), "2 inputs"),
])
def test_each_difference_is_named(declared, fragment):
    problems = signature_mismatches(*declared, *ACTUAL)
    assert problems and any(fragment in p for p in problems), problems


@pytest.mark.parametrize("declared", [
    ((T("x", "float32", None, 1, 8, 8),), (T("y", "float32", None, 10),)),
    ((T("x", "float32", 4, 1, 8, 8),), (T("y", "float32", 4, 10),)),  # a fixed batch
])
def test_a_matching_declaration_passes(declared):
    assert signature_mismatches(*declared, *ACTUAL) == []


def test_positional_match_when_a_converter_renamed_the_tensors():
    actual = ((S("serving_default_x:0", "float32", 1, 4),),
              (S("StatefulPartitionedCall:0", "float32", 1, 3),))
    declared = ((T("x", "float32", None, 4),), (T("y", "float32", None, 3),))
    assert signature_mismatches(*declared, *actual, by_position=True) == []
    assert signature_mismatches(*declared, *actual) != []


def test_a_release_declaring_the_wrong_input_shape_is_refused_by_the_health_check(
        loop_env, tmp_path):
    fleet = Fleet(loop_env, tmp_path)
    loop_env.start_agent("dev")
    fleet.release("m", 1, models.good(1))
    loop_env.wait_serving("dev", 1)
    bundle = models.write_bundle(tmp_path / "v2", "m", 2, models.good(2))
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    manifest["inputs"][0]["shape"] = [None, 5]  # the model takes [N, 4]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    loop_env.release(bundle)
    ev = loop_env.wait_failed("dev", 2)
    assert ev["reason"] == "model_signature_mismatch", ev
    assert "[N, 5]" in ev["detail"] and "[N, 4]" in ev["detail"]
    x = models.golden_inputs()[:2]
    doc = predict(loop_env.agents[0], "m", x)
    assert doc["version"] == 1
    np.testing.assert_allclose(doc["outputs"]["y"], x @ models.weights(1), rtol=1e-5)
