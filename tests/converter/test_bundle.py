"""Bundle integrity: every byte the manifest describes is checked before use."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from edgeship.agent.errors import BundleError
from edgeship.agent.manifest import GOLDEN_NAME, MANIFEST_NAME
from edgeship.converter.bundle import VariantArtifact, pack_bundle, read_bundle_dir, write_bundle


@pytest.fixture
def bundle(converted, tmp_path):
    """A private copy of the session's bundle that a test may damage."""
    return shutil.copytree(converted.bundle_dir, tmp_path / "digits-v1")


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.fp32.onnx", "model.int8.onnx", GOLDEN_NAME])
def test_one_flipped_byte_is_rejected(bundle, name):
    path = bundle / name
    _flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(BundleError, match="sha256"):
        read_bundle_dir(bundle)


def test_truncated_variant_is_rejected(bundle):
    path = bundle / "model.int8.onnx"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError, match="bytes, manifest says"):
        read_bundle_dir(bundle)


def test_missing_variant_file_is_rejected(bundle):
    (bundle / "model.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_bundle_dir(bundle)


def test_manifest_pointing_outside_the_bundle_is_rejected(bundle):
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    raw["variants"][0]["file"] = "../model.fp32.onnx"
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="bad file name"):
        read_bundle_dir(bundle)


def test_pack_is_sorted_flat_files_and_reproducible(bundle, tmp_path):
    tar_path = pack_bundle(bundle)
    assert tar_path == bundle.parent / "digits-v1.tar"
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted([GOLDEN_NAME, MANIFEST_NAME, "model.fp32.onnx",
                            "model.int8.onnx"])
    assert all(m.isfile() and m.mtime == 0 for m in members)
    again = pack_bundle(bundle, tmp_path / "again.tar")
    assert again.read_bytes() == tar_path.read_bytes()


def test_unpacked_tar_verifies(bundle, tmp_path):
    with tarfile.open(pack_bundle(bundle)) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert read_bundle_dir(tmp_path / "unpacked").version == 1


def test_write_bundle_refuses_existing_directory(converted, bundle):
    fp32 = VariantArtifact("onnx-fp32", "onnxruntime", "fp32", bundle / "model.fp32.onnx")
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(bundle, "digits", 1, [fp32], _golden(bundle))
    assert read_bundle_dir(bundle) == converted.manifest


def test_write_bundle_overwrite_replaces_whole_directory(bundle):
    fp32 = VariantArtifact("onnx-fp32", "onnxruntime", "fp32", bundle / "model.fp32.onnx")
    src = bundle.parent / "src.onnx"
    shutil.copyfile(fp32.path, src)
    fp32 = VariantArtifact("onnx-fp32", "onnxruntime", "fp32", src)
    manifest = write_bundle(bundle, "digits", 2, [fp32], _golden(bundle), overwrite=True)
    assert read_bundle_dir(bundle) == manifest
    assert sorted(p.name for p in bundle.iterdir()) == [GOLDEN_NAME, MANIFEST_NAME,
                                                        "model.fp32.onnx"]
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")] == []


def _golden(bundle):
    import numpy as np

    with np.load(bundle / GOLDEN_NAME) as g:
        return g["in:input"][:, 0]  # per-sample arrays of batch 1 -> rows


def test_the_profile_reuses_the_evaluation_outputs_and_equals_a_fresh_pass(tmp_path,
                                                                           monkeypatch):
    """The converter's evaluation ran every variant over the validation samples already:
    the profile is built from those outputs (no second pass), and it is the profile a
    fresh pass over the shipped files gives. Outputs that cover fewer samples than the
    profile takes are not used."""
    import numpy as np

    from edgeship.converter import bundle
    from edgeship.converter.gates import Gate
    from edgeship.converter.pipeline import ConvertSettings, convert_onnx
    from edgeship.converter.samples import Samples
    from tests.support.synthetic import quality_labels, write_model

    x = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    model = write_model(tmp_path / "m.onnx", width=16, depth=1)
    y = quality_labels(model, x, 0.1, 0)
    passes: list[str] = []
    fresh_pass = bundle._run_variant
    monkeypatch.setattr(bundle, "_run_variant",
                        lambda v, s: passes.append(v.id) or fresh_pass(v, s))
    result = convert_onnx(model, x[:100], x, tmp_path / "b", "m", 1, val_y=y,
                          gate=Gate(max_accuracy_drop_points=5.0, min_agreement=0.9),
                          settings=ConvertSettings(task="classification"))
    shipped = [v.id for v in result.manifest.variants]
    assert passes == [] and result.manifest.profile["samples"] == 300

    variants = [VariantArtifact(v.id, v.runtime, v.precision, result.bundle_dir / v.file)
                for v in result.manifest.variants]
    in_specs, out_specs = bundle.tensor_specs(variants[0].path)
    opts = bundle.BundleOptions(task="classification")
    samples = Samples.from_rows("x", x, y)
    fresh = bundle._profile(variants, samples, in_specs, out_specs, opts)
    assert passes == shipped and "onnx-int8" in shipped
    assert fresh == result.manifest.profile
    short = {v.id: [[np.zeros((1, 10), np.float32)]] * 299 for v in variants}
    assert bundle._profile(variants, samples, in_specs, out_specs, opts, short) == fresh
    assert passes == shipped * 2


def test_profile_estimate_is_fitted_on_each_variants_own_outputs(converted, trained):
    """Every variant gets its own validation accuracy, mean confidence (DoC) and ATC
    threshold, computed from that variant's outputs on the validation set."""
    import numpy as np

    from edgeship.agent.quality.features import class_probabilities
    from edgeship.agent.quality.profile import parse_profile
    from edgeship.agent.runtime import load_runtime

    manifest = read_bundle_dir(converted.bundle_dir)
    profile = parse_profile(manifest.profile)
    x, y = trained.data.x_test, trained.data.y_test
    seen = set()
    for variant in manifest.variants:
        runtime = load_runtime(variant.runtime, converted.bundle_dir / variant.file, threads=1)
        name = manifest.inputs[0].name
        logits = np.concatenate([runtime.run({name: x[i:i + 1]})[0] for i in range(len(x))])
        probs = class_probabilities(logits, "logits")
        est = profile.estimator(variant.id)
        assert est is not None and est.method == "doc"
        assert est.accuracy == pytest.approx((probs.argmax(1) == y).mean())
        assert est.mean_confidence == pytest.approx(probs.max(1).mean(), abs=1e-6)
        assert (probs.max(1) > est.threshold).mean() == pytest.approx(est.accuracy,
                                                                       abs=1 / len(y))
        seen.add((est.threshold, est.mean_confidence))
    assert len(seen) == len(manifest.variants)  # not one variant's numbers copied to all
