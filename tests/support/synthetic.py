"""Synthetic model bundles for fleet tests and benchmarks: a dense ONNX network whose size
(``width``² float32 weights) and compute (``depth`` passes through the same weights) are
chosen independently, so a release can be made N× slower at the same size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def write_model(path: Path, *, width: int, depth: int, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    head = (rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("MatMul", [prev, "H"], ["logits"]))
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(head, "H")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def write_synthetic_bundle(out_dir: Path, *, model: str = "synth", version: int = 1,
                           width: int = 724, depth: int = 1, seed: int = 0) -> Path:
    """A bundle with one fp32 variant (width=724: about 2 MB of weights)."""
    from edgeship.converter.bundle import VariantArtifact, write_bundle

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = write_model(Path(tmp) / "model.onnx", width=width, depth=depth, seed=seed)
        golden = np.random.default_rng(seed + 1).standard_normal((4, width)).astype(np.float32)
        write_bundle(out_dir, model, version,
                     [VariantArtifact("onnx-fp32", "onnxruntime", "fp32", onnx_path)],
                     golden, labels=[str(i) for i in range(10)], overwrite=True)
    return out_dir


def sample_inputs(width: int, rows: int = 8, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def write_quality_bundle(out_dir: Path, *, model: str = "synq", version: int = 1,
                         width: int = 16, seed: int = 0, samples: int = 600,
                         label_noise: float = 0.1) -> Path:
    """A small classifier (x[N, width] → logits[N, 10]) with a reference profile from
    ``samples`` N(0, 1) inputs whose labels are its own top-1 class, a share
    ``label_noise`` of them replaced at random (about 90 % accuracy)."""
    from edgeship.converter.bundle import VariantArtifact, write_bundle

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed + 7)
    x = rng.standard_normal((samples, width)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = write_model(Path(tmp) / "model.onnx", width=width, depth=1, seed=seed)
        y = quality_labels(onnx_path, x, label_noise, seed)
        write_bundle(out_dir, model, version,
                     [VariantArtifact("onnx-fp32", "onnxruntime", "fp32", onnx_path)],
                     x[:4], labels=[str(i) for i in range(10)], overwrite=True,
                     profile_samples=(x, y))
    return out_dir


def quality_labels(onnx_path: Path, x: np.ndarray, label_noise: float, seed: int
                   ) -> np.ndarray:
    """The model's own classes with a share ``label_noise`` replaced at random."""
    import onnxruntime as ort

    logits = ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0]
    rng = np.random.default_rng(seed + 11)
    y = logits.argmax(axis=1)
    flip = rng.random(len(y)) < label_noise
    y[flip] = rng.integers(0, 10, int(flip.sum()))
    return y
