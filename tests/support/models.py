"""Tiny ONNX models (built with onnx.helper) and bundles for the safe-install tests.

Every model maps x[N,4] → y[N,3]. ``good`` computes x @ W(k); the bad ones are real ONNX
graphs that onnxruntime runs: NaN outputs (log of a negative), a wrong output shape, a
loop of matrix products that makes them slow (or, with a huge trip count, hang), and a
Gather whose index comes from the input, so it fails at run time on live inputs > 10
while passing the health check on the golden inputs (all in [0, 1)).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeship.agent.manifest import GOLDEN_NAME, MANIFEST_NAME, Manifest, TensorSpec, Variant

GOLDEN_N = 8
VARIANT_ID = "onnx-fp32"
MODEL_FILE = "model.fp32.onnx"


def weights(k: int) -> np.ndarray:
    return (np.arange(12, dtype=np.float32).reshape(4, 3) / 10 + k).astype(np.float32)


def golden_inputs() -> np.ndarray:
    return np.random.default_rng(0).random((GOLDEN_N, 4), dtype=np.float32)


def _model(nodes, inits, out_dim: int = 3, extra_graphs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "edgeship-test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _w(k: int, cols: int = 3):
    w = weights(k) if cols == 3 else np.ones((4, cols), np.float32)
    return numpy_helper.from_array(w, "W")


def good(k: int) -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_w(k)])


def nan_outputs(k: int) -> onnx.ModelProto:
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    return _model([helper.make_node("MatMul", ["x", "W"], ["m"]),
                   helper.make_node("Mul", ["m", "zero"], ["z"]),
                   helper.make_node("Sub", ["z", "one"], ["neg"]),
                   helper.make_node("Log", ["neg"], ["y"])], [_w(k), zero, one])


def wrong_shape(k: int) -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_w(k, cols=5)],
                  out_dim=5)


def heavy(k: int, iterations: int, size: int = 256) -> onnx.ModelProto:
    """x @ W(k) plus 0 × (a loop of ``iterations`` size×size matrix products)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["s_in", "B"], ["p"]),
         helper.make_node("Tanh", ["p"], ["s_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [size, size])])
    rng = np.random.default_rng(k)
    inits = [_w(k),
             numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(rng.random((size, size), np.float32) / size, "B"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
             helper.make_node("Expand", ["xmax", "shape"], ["s0"]),
             helper.make_node("Loop", ["trips", "cond", "s0"], ["s_final"], body=body),
             helper.make_node("ReduceMean", ["s_final"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "nothing"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([size, size], np.int64), "shape"))
    return _model(nodes, inits)


def fails_on_large_inputs(k: int) -> onnx.ModelProto:
    """Gather(table[10], int(max(x))): fine for golden inputs in [0, 1), a run-time error
    ("indices element out of data bounds") for a live input ≥ 10."""
    inits = [_w(k), numpy_helper.from_array(np.zeros(10, np.float32), "table"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
             helper.make_node("Cast", ["xmax"], ["idx"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "idx"], ["g"]),
             helper.make_node("Mul", ["g", "zero"], ["nothing"]),
             helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "nothing"], ["y"])]
    return _model(nodes, inits)


def reversed_classes(k: int) -> onnx.ModelProto:
    """A healthy model (its golden outputs match) whose top-1 class is never the one
    ``good`` picks: the output columns are reversed."""
    w = numpy_helper.from_array(np.ascontiguousarray(weights(k)[:, ::-1]), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [w])


def memory_hog(k: int, floats: int = 800_000_000) -> onnx.ModelProto:
    """x @ W(k) plus 0 × the mean of a ``floats``-element tensor (3.2 GB by default)."""
    inits = [_w(k), numpy_helper.from_array(np.array([floats], np.int64), "n"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ConstantOfShape", ["n"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceMean", ["big"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "nothing"], ["y"])]
    return _model(nodes, inits)


def write_bundle(out: Path, model: str, version: int, onnx_model: onnx.ModelProto,
                 k: int | None = None, atol: float = 1e-4, shadow=None,
                 golden_weights: np.ndarray | None = None) -> Path:
    """A bundle whose golden outputs are what a *good* model k would produce (or
    ``x @ golden_weights``)."""
    k = version if k is None else k
    out.mkdir(parents=True, exist_ok=True)
    data = onnx_model.SerializeToString()
    (out / MODEL_FILE).write_bytes(data)
    x = golden_inputs()
    w = weights(k) if golden_weights is None else golden_weights
    np.savez(out / GOLDEN_NAME, inputs=x, **{VARIANT_ID: x @ w})
    golden = (out / GOLDEN_NAME).read_bytes()
    manifest = Manifest(
        model=model, version=version, task="regression",
        inputs=(TensorSpec("x", "float32", (None, 4)),),
        outputs=(TensorSpec("y", "float32", (None, 3)),),
        variants=(Variant(id=VARIANT_ID, runtime="onnxruntime", precision="fp32",
                          file=MODEL_FILE, sha256=sha256(data), size=len(data),
                          golden_atol=atol),),
        golden_file=GOLDEN_NAME, golden_sha256=sha256(golden), golden_size=len(golden),
        shadow=shadow)
    (out / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_sha(bundle: Path) -> str:
    return json.loads((bundle / MANIFEST_NAME).read_bytes())["variants"][0]["sha256"]


# --- models with several inputs of different dtypes (the local API's and OIP tests) ----------

def multi_input() -> onnx.ModelProto:
    """x float32 [N,4], k int64 [N,1], m bool [N,4] -> y float32 [N,4] = where(m, x, 0) * k
    and count int64 [N] = how many of m are true per row."""
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("Where", ["m", "x", "zero"], ["kept"]),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["kept", "kf"], ["y"]),
             helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
             helper.make_node("ReduceSum", ["mi", "axes"], ["count"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "multi-input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 1]),
         helper.make_tensor_value_info("m", TensorProto.BOOL, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("count", TensorProto.INT64, ["N"])],
        initializer=[zero, axes])
    return _finish(graph)


MULTI_INPUTS = (TensorSpec("x", "float32", (None, 4)), TensorSpec("k", "int64", (None, 1)),
                TensorSpec("m", "bool", (None, 4)))
MULTI_OUTPUTS = (TensorSpec("y", "float32", (None, 4)), TensorSpec("count", "int64", (None,)))


def multi_input_feed(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4)).astype(np.float32),
            "k": rng.integers(-3, 4, size=(n, 1)).astype(np.int64),
            "m": rng.random((n, 4)) < 0.5}


def stateful() -> onnx.ModelProto:
    """One recurrent step: x float32 [N,3], h float32 [1,N,5] (batch on axis 1), sr int64
    scalar -> y float32 [N,5] and h_out [1,N,5], h_out = tanh(x W + h U + sr / 16000)."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 5)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(5, 5)).astype(np.float32) / 3, "U"),
             numpy_helper.from_array(np.array(16000.0, np.float32), "scale"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Squeeze", ["h", "axis0"], ["h2"]),
             helper.make_node("MatMul", ["h2", "U"], ["hu"]),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "scale"], ["bias"]),
             helper.make_node("Add", ["xw", "hu"], ["s"]),
             helper.make_node("Add", ["s", "bias"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["y"]),
             helper.make_node("Unsqueeze", ["y", "axis0"], ["h_out"])]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "N", 5]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, "N", 5])],
        initializer=inits)
    return _finish(graph)


STATEFUL_INPUTS = (TensorSpec("x", "float32", (None, 3)), TensorSpec("h", "float32", (1, None, 5)),
                   TensorSpec("sr", "int64", ()))
STATEFUL_OUTPUTS = (TensorSpec("y", "float32", (None, 5)),
                    TensorSpec("h_out", "float32", (1, None, 5)))

#: every numeric datatype of the protocol the runtime runs: name -> (onnx type, dtype)
EVERY_DTYPE = {"b": (TensorProto.BOOL, "bool"), "i8": (TensorProto.INT8, "int8"),
               "u8": (TensorProto.UINT8, "uint8"), "i16": (TensorProto.INT16, "int16"),
               "i32": (TensorProto.INT32, "int32"), "i64": (TensorProto.INT64, "int64"),
               "f16": (TensorProto.FLOAT16, "float16"), "f32": (TensorProto.FLOAT, "float32"),
               "f64": (TensorProto.DOUBLE, "float64")}


def every_dtype() -> onnx.ModelProto:
    """Identity for one input per dtype: in_<key> [N,2] -> out_<key> [N,2]."""
    nodes = [helper.make_node("Identity", [f"in_{k}"], [f"out_{k}"]) for k in EVERY_DTYPE]
    graph = helper.make_graph(
        nodes, "every-dtype",
        [helper.make_tensor_value_info(f"in_{k}", t, ["N", 2]) for k, (t, _) in
         EVERY_DTYPE.items()],
        [helper.make_tensor_value_info(f"out_{k}", t, ["N", 2]) for k, (t, _) in
         EVERY_DTYPE.items()])
    return _finish(graph)


def every_dtype_specs() -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    return (tuple(TensorSpec(f"in_{k}", d, (None, 2)) for k, (_, d) in EVERY_DTYPE.items()),
            tuple(TensorSpec(f"out_{k}", d, (None, 2)) for k, (_, d) in EVERY_DTYPE.items()))


IMAGE_SHAPE = (1, 3, 128, 128)  # 196 KB of float32: large enough for the bulk data paths
IMAGE_INPUTS = (TensorSpec("img", "float32", IMAGE_SHAPE),)
IMAGE_OUTPUTS = (TensorSpec("twice", "float32", IMAGE_SHAPE),)


def image_doubler() -> onnx.ModelProto:
    """img float32 1x3x128x128 -> twice = img + img (exact in float32)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["img", "img"], ["twice"])], "image-doubler",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, list(IMAGE_SHAPE))],
        [helper.make_tensor_value_info("twice", TensorProto.FLOAT, list(IMAGE_SHAPE))])
    return _finish(graph)


def _finish(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def serve_onnx(path: Path, model: str, onnx_model: onnx.ModelProto, inputs, outputs,
               server=None, version: int = 1):
    """``onnx_model`` served as ``model`` v``version`` the way the agent serves a bundle."""
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.serving import LoadedModel, ModelServer
    from edgeship.agent.store import InstalledModel

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    variant = Variant(id="onnx-fp32", runtime="onnxruntime", precision="fp32",
                      file=path.name, sha256="0" * 64, size=path.stat().st_size)
    manifest = Manifest(model=model, version=version, task="generic", inputs=tuple(inputs),
                        outputs=tuple(outputs), variants=(variant,),
                        golden_file=GOLDEN_NAME, golden_sha256="0" * 64, golden_size=1)
    server = server or ModelServer()
    inst = InstalledModel(model, version, variant, manifest, path.parent)
    server.swap(LoadedModel(inst, load_runtime("onnxruntime", path, threads=1)))
    return server


def write_named_bundle(out: Path, model: str, version: int, onnx_model: onnx.ModelProto,
                       inputs, outputs, feeds: list[dict[str, np.ndarray]]) -> Path:
    """A bundle for a model with any inputs: the golden file keyed by tensor name (format
    2 of ``edgeship.agent.golden``), its outputs from onnxruntime on ``feeds``."""
    import onnxruntime as ort
    from edgeship.agent.golden import budget_bytes, pack

    out.mkdir(parents=True, exist_ok=True)
    data = onnx_model.SerializeToString()
    (out / MODEL_FILE).write_bytes(data)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    results = [session.run(None, feed) for feed in feeds]
    arrays = pack({s.name: np.stack([f[s.name] for f in feeds]) for s in inputs}, {},
                  {VARIANT_ID: {o.name: [r[j] for r in results]
                                for j, o in enumerate(outputs)}}, budget_bytes(len(data)))
    np.savez(out / GOLDEN_NAME, **arrays)
    golden = (out / GOLDEN_NAME).read_bytes()
    manifest = Manifest(
        model=model, version=version, task="generic", inputs=tuple(inputs),
        outputs=tuple(outputs),
        variants=(Variant(id=VARIANT_ID, runtime="onnxruntime", precision="fp32",
                          file=MODEL_FILE, sha256=sha256(data), size=len(data)),),
        golden_file=GOLDEN_NAME, golden_sha256=sha256(golden), golden_size=len(golden))
    (out / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    return out
