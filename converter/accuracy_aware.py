"""Accuracy-aware static INT8: keep the layers that hurt most in float until the gate passes.

1. Quantize everything (QDQ, per-channel; :func:`converter.quantize.quantize_first` finds
   a pre-processing that works on the graph) and gate it.
2. If it fails, run the QDQ model on calibration data with every intermediate tensor
   exposed (onnxruntime's ``qdq_loss_debug``: ``modify_model_output_intermediate_tensors``,
   ``collect_activations``, ``create_activation_matching``) and score each quantized
   activation by the error its QuantizeLinear→DequantizeLinear pair adds.
3. Keep the worst tensor in float (its producer and consumers go to ``nodes_to_exclude``),
   re-quantize, re-gate; repeat until the gate passes or ``max_rounds`` is reached.

The scoring (:func:`rank_nodes`) is pure; the rest drives onnxruntime.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from edgeship.converter.graph import scratch_cwd
from edgeship.converter.quantize import (Prepared, QuantizeSettings, SamplesCalibrationReader,
                                         quantize_first, quantize_prepared)
from edgeship.converter.samples import Samples

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class FallbackSettings:
    enabled: bool = True
    max_rounds: int = 6
    debug_samples: int = 32  # calibration samples run through the QDQ model for scoring
    # An "int8" model with most of its nodes in float is not worth shipping as int8.
    max_float_node_fraction: float = 0.5


@dataclass(frozen=True)
class FallbackResult:
    path: Path
    excluded: tuple[str, ...]  # node names kept in float
    rounds: int  # quantize+gate attempts, the first (all-int8) included
    passed: bool
    history: tuple[dict, ...]  # per round: excluded count and the gate failures
    prepared: Prepared | None = None  # the pre-processing rung that worked

    def notes(self) -> dict:
        notes = {"nodes_in_float": list(self.excluded), "int8_rounds": self.rounds}
        if self.prepared is not None:
            notes.update(self.prepared.notes())
        return notes


def relative_error(reference: np.ndarray, noisy: np.ndarray) -> float:
    """Mean of ``min(1, |ref - noisy| / |ref|)`` over the non-zero reference elements.

    Unlike SQNR, which a few large outliers dominate, this counts every element equally, so
    a tensor whose per-tensor scale crushes most values to zero scores close to 1.
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    err = np.abs(ref - np.asarray(noisy, dtype=np.float64).ravel())
    nonzero = np.abs(ref) > 0
    if not nonzero.any():
        return 0.0
    return float(np.minimum(1.0, err[nonzero] / np.abs(ref[nonzero])).mean())


def rank_tensors(tensor_error: Mapping[str, float], skip: Sequence[str] = ()) -> list[str]:
    """Quantized activation tensors ordered by their quantization error (worst first)."""
    return [t for t, _ in sorted(tensor_error.items(), key=lambda kv: -kv[1])
            if t not in skip]


def nodes_touching(tensor: str, nodes: Sequence[tuple[str, Sequence[str], Sequence[str]]]
                   ) -> list[str]:
    """Producer and consumers of ``tensor``: all must stay float to keep it unquantized."""
    return [name for name, inputs, outputs in nodes if tensor in inputs or tensor in outputs]


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "LSTM", "GRU")


def _graph_nodes(path: Path) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    import onnx

    graph = onnx.load(str(path)).graph
    return [(n.name, tuple(n.input), tuple(n.output)) for n in graph.node if n.name]


def _compute_nodes(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in COMPUTE_OPS]


def _activations(model: Path, aug: Path, samples: Samples) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, modify_model_output_intermediate_tensors)

    with scratch_cwd():
        modify_model_output_intermediate_tensors(str(model.resolve()), str(aug.resolve()))
        return collect_activations(str(aug.resolve()), SamplesCalibrationReader(samples))


def activation_errors(qdq_model: Path, samples: Samples, work: Path) -> dict[str, float]:
    """:func:`relative_error` of each activation before vs after its QuantizeLinear →
    DequantizeLinear pair (``qdq_loss_debug``'s ``pre_qdq``/``post_qdq`` matching)."""
    from onnxruntime.quantization.qdq_loss_debug import create_activation_matching

    matched = create_activation_matching(_activations(qdq_model, work / "aug-qdq.onnx",
                                                      samples))
    out = {}
    for name, pair in matched.items():
        pre, post = pair.get("pre_qdq"), pair.get("post_qdq")
        if pre is None or post is None:
            continue
        out[name] = relative_error(np.concatenate([v.ravel() for v in pre]),
                                   np.concatenate([v.ravel() for v in post]))
    return out


GateFn = Callable[[Path], list]  # gate failures of the variant at a path; empty = pass


def quantize_with_fallback(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                           calibration: Samples, gate_fn: GateFn,
                           settings: QuantizeSettings = QuantizeSettings(),
                           fallback: FallbackSettings = FallbackSettings()) -> FallbackResult:
    """Static INT8 that keeps the most harmful nodes in float until ``gate_fn`` passes."""
    out = Path(out_path).resolve()
    with tempfile.TemporaryDirectory(prefix=".aaq-", dir=out.parent) as tmp:
        work = Path(tmp)
        prepared = quantize_first(fp32_path, out, calibration, work, settings)
        return _search(prepared, out, calibration, gate_fn, settings, fallback, work)


def _search(prepared: Prepared, out: Path, calib: Samples, gate_fn: GateFn,
            settings: QuantizeSettings, fallback: FallbackSettings,
            work: Path) -> FallbackResult:
    nodes = _graph_nodes(prepared.path)
    compute = set(_compute_nodes(prepared.path))
    excluded: list[str] = []
    kept_float: list[str] = []  # tensors already taken out of quantization
    history: list[dict] = []
    for round_no in range(1, fallback.max_rounds + 1):
        if round_no > 1:
            quantize_prepared(prepared, out, calib, settings, tuple(excluded))
        failures = [str(f) for f in gate_fn(out)]
        history.append({"excluded": len(excluded), "tensors_in_float": list(kept_float),
                        "failures": failures})
        logger.info("int8 round %d: %d node(s) in float, %s", round_no, len(excluded),
                    "pass" if not failures else "; ".join(failures))
        if not failures:
            return FallbackResult(out, tuple(excluded), round_no, True, tuple(history),
                                  prepared)
        ranked = rank_tensors(activation_errors(out, calib.take(fallback.debug_samples),
                                                work), skip=kept_float)
        added = _exclude_next(ranked, nodes, excluded, kept_float)
        in_float = len(compute.intersection(excluded))
        if not added or in_float > fallback.max_float_node_fraction * len(compute):
            logger.info("int8 fallback gives up: %d of %d compute nodes already in float",
                        in_float, len(compute))
            break
    excluded = excluded[:history[-1]["excluded"]]  # what the model at ``out`` was made with
    return FallbackResult(out, tuple(excluded), len(history), False, tuple(history),
                          prepared)


def _exclude_next(ranked: Sequence[str], nodes, excluded: list[str],
                  kept_float: list[str]) -> bool:
    """Keep the worst tensor that still adds a node to ``excluded`` in float."""
    for tensor in ranked:
        kept_float.append(tensor)
        new = [n for n in nodes_touching(tensor, nodes) if n not in excluded]
        if new:
            excluded.extend(new)
            logger.info("keeping %s in float (nodes %s)", tensor, new)
            return True
    return False
