"""Write a small, real .tflite model (dense layer + softmax) with LiteRT's own flatbuffer
schema, so LiteRT tests need neither TensorFlow nor litert-torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dense_tflite(path: Path, weights: np.ndarray, bias: np.ndarray,
                       input_name: str = "x", fixed_batch: bool = False) -> Path:
    """y = softmax(x @ weights.T + bias); x is float32 [N, in], y float32 [N, out]
    (``fixed_batch``: [1, in] → [1, out], as litert-torch exports)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    out_dim, in_dim = weights.shape

    def buffer(data: bytes | None) -> "s.BufferT":
        b = s.BufferT()
        b.data = list(data) if data else None
        return b

    def tensor(name: str, shape: list[int], buf: int, signature: list[int] | None = None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), shape, s.TensorType.FLOAT32, buf
        t.shapeSignature = signature
        return t

    buffers = [buffer(None), buffer(weights.astype(np.float32).tobytes()),
               buffer(bias.astype(np.float32).tobytes()), buffer(None), buffer(None),
               buffer(None)]
    n = 1 if fixed_batch else -1
    tensors = [tensor(input_name, [1, in_dim], 3, [n, in_dim]),
               tensor("w", [out_dim, in_dim], 1), tensor("b", [out_dim], 2),
               tensor("logits", [1, out_dim], 4, [n, out_dim]),
               tensor("probs", [1, out_dim], 5, [n, out_dim])]
    fc_code, sm_code = s.OperatorCodeT(), s.OperatorCodeT()
    fc_code.builtinCode = fc_code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    sm_code.builtinCode = sm_code.deprecatedBuiltinCode = s.BuiltinOperator.SOFTMAX
    fc_code.version = sm_code.version = 1
    fc = s.OperatorT()
    fc.opcodeIndex, fc.inputs, fc.outputs = 0, [0, 1, 2], [3]
    fc.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    fc.builtinOptions = s.FullyConnectedOptionsT()
    sm = s.OperatorT()
    sm.opcodeIndex, sm.inputs, sm.outputs = 1, [3], [4]
    sm.builtinOptionsType = s.BuiltinOptions.SoftmaxOptions
    sm.builtinOptions = s.SoftmaxOptionsT()
    sm.builtinOptions.beta = 1.0
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs = tensors, [0], [4]
    graph.operators, graph.name = [fc, sm], b"main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [fc_code, sm_code], [graph]
    model.buffers, model.description = buffers, b"edgeship test dense"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def reference(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) @ weights.T.astype(np.float64) + bias
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
