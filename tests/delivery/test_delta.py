"""Deltas: model-aware for ONNX (only changed tensors travel, the file is rebuilt
byte-identically), generic zstd patch otherwise, and on the device a wrong rebuild is
rejected against the signed length/hash and replaced by the full download."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeship.agent.delta import DeltaError, apply_delta, read_header
from edgeship.fleet.delta import make_delta, onnx_delta, zstd_patch
from edgeship.fleet.tuf_repo import RepoSettings, delta_target_path, release_bundle
from tests.delivery.helpers import edit_targets, start_agent, variant_target, wait_event


def _model(w1: np.ndarray, w2: np.ndarray) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["y"])], "g", [x], [y],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph).SerializeToString()


@pytest.fixture
def two_versions(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((256, 256)).astype(np.float32)
    head = rng.standard_normal((256, 10)).astype(np.float32)
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(_model(w1, head))
    new.write_bytes(_model(w1, head + 0.01))  # only the last layer retrained
    return old, new


def test_onnx_delta_carries_only_changed_tensors_and_rebuilds_byte_identically(two_versions,
                                                                               tmp_path):
    old, new = two_versions
    delta = onnx_delta(old.read_bytes(), new.read_bytes())
    assert read_header(io.BytesIO(delta)).method == "onnx-tensors"
    assert len(delta) < 0.1 * new.stat().st_size  # the 256 KiB body tensor is not sent
    assert len(make_delta(old, new)) <= len(delta)  # the release keeps the smaller one
    (tmp_path / "d").write_bytes(delta)
    apply_delta(tmp_path / "d", old, tmp_path / "out", max_bytes=10**8)
    assert (tmp_path / "out").read_bytes() == new.read_bytes()


def test_generic_zstd_patch_rebuilds_any_file(tmp_path):
    base = np.random.default_rng(1).bytes(300_000)
    new = base[:1000] + b"changed" + base[1000:]
    (tmp_path / "b").write_bytes(base)
    (tmp_path / "d").write_bytes(zstd_patch(base, new))
    assert (tmp_path / "d").stat().st_size < 2000
    apply_delta(tmp_path / "d", tmp_path / "b", tmp_path / "o", max_bytes=10**6)
    assert (tmp_path / "o").read_bytes() == new


def test_delta_for_another_base_or_bigger_than_announced_is_refused(two_versions, tmp_path):
    old, new = two_versions
    (tmp_path / "d").write_bytes(onnx_delta(old.read_bytes(), new.read_bytes()))
    with pytest.raises(DeltaError):  # applied to the wrong base
        apply_delta(tmp_path / "d", new, tmp_path / "o", max_bytes=10**8)
    with pytest.raises(DeltaError):  # rebuilds more than the device allows
        apply_delta(tmp_path / "d", old, tmp_path / "o", max_bytes=100)


def test_update_is_rebuilt_from_a_delta_on_the_device(loop_env, digits_bundles):
    agent = start_agent(loop_env, "dev")
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1)
    info = release_bundle(digits_bundles[2].bundle_dir, loop_env.repo, loop_env.keys,
                          RepoSettings(deltas=True))
    loop_env.announce("digits", 2)
    assert delta_target_path("digits/2/model.fp32.onnx", 1) in info.targets
    loop_env.wait_serving("dev", 2)
    full = variant_target(loop_env.repo, 2)
    full_path = "targets/" + str(full.relative_to(loop_env.repo / "targets"))
    assert full_path not in agent.transfers.received_by_path  # never downloaded in full
    assert agent.store.active("digits").model_path.read_bytes() == full.read_bytes()


def test_wrong_reconstruction_is_rejected_and_the_full_file_downloaded(loop_env,
                                                                       digits_bundles):
    agent = start_agent(loop_env, "dev")
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1)
    release_bundle(digits_bundles[2].bundle_dir, loop_env.repo, loop_env.keys,
                   RepoSettings(deltas=True))
    base = variant_target(loop_env.repo, 1).read_bytes()
    wrong = bytearray(variant_target(loop_env.repo, 2).read_bytes())
    wrong[-100] ^= 0xFF
    # a validly signed delta that rebuilds the wrong bytes (a host-side bug, say)
    bad = onnx_delta(base, bytes(wrong))
    path = delta_target_path("digits/2/model.fp32.onnx", 1)
    sha = hashlib.sha256(bad).hexdigest()
    (loop_env.repo / "targets" / "digits" / "2" / f"{sha}.{path.rsplit('/', 1)[1]}") \
        .write_bytes(bad)

    def point_at_bad(targets):
        targets.targets[path].length = len(bad)
        targets.targets[path].hashes = {"sha256": sha}
    edit_targets(loop_env.repo, loop_env.keys, point_at_bad)
    loop_env.announce("digits", 2)
    loop_env.wait_serving("dev", 2)
    ev = wait_event(loop_env, "dev", "delta_rejected", 2)
    assert ev["reason"] == "delta_mismatch"
    full = variant_target(loop_env.repo, 2)
    assert agent.store.active("digits").model_path.read_bytes() == full.read_bytes()
    assert list(agent.cfg.downloads_dir.iterdir()) == []
