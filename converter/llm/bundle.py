"""Bundle of a language model: one self-contained ONNX file per variant (weights, tokenizer,
genai config), the manifest with its ``llm`` section, and ``golden.npz`` holding a golden
prompt's token ids and each variant's next-token logits for the device's health check."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeship.agent.errors import BundleError
from edgeship.agent.llm.spec import LLM_RUNTIME, TASK, LlmSpec
from edgeship.agent.manifest import GOLDEN_NAME, Manifest, TensorSpec
from edgeship.converter.bundle import (VariantArtifact, _build_variants, _npz_bytes,
                                       _write_file, finish_bundle, sha256_file)
from edgeship.converter.llm.evaluate import LogitsRunner

logger = logging.getLogger(__name__)

FLOAT_ATOL, FLOAT_RELATIVE_ATOL = 2e-3, 1e-3
INT_ATOL, INT_RELATIVE_ATOL = 0.05, 0.05


@dataclass(frozen=True)
class LlmArtifact:
    id: str
    precision: str
    path: Path
    metrics: dict[str, float]


def llm_golden_atol(precision: str, logits: np.ndarray) -> float:
    """Tolerance on golden logits: int kernels round differently per CPU (AVX2, VNNI, NEON
    dot products), so theirs scales with the logits' magnitude."""
    peak = float(np.abs(logits).max())
    if precision.startswith("int"):
        return max(INT_ATOL, INT_RELATIVE_ATOL * peak)
    return max(FLOAT_ATOL, FLOAT_RELATIVE_ATOL * peak)


def golden_logits(path: Path, ids: np.ndarray, head_dim: int) -> np.ndarray:
    return LogitsRunner(path, head_dim, threads=1).logits(ids)[-1][None].astype(np.float32)


def write_llm_bundle(out_dir: str | Path, name: str, version: int,
                     artifacts: Sequence[LlmArtifact], golden_ids: np.ndarray, spec: LlmSpec,
                     *, reference: dict[str, float], overwrite: bool = False) -> Path:
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another directory or version")
    ids = np.asarray(golden_ids, dtype=np.int64)[None]
    golden = {a.id: golden_logits(a.path, ids[0], spec.head_dim) for a in artifacts}
    variants = [VariantArtifact(id=a.id, runtime=LLM_RUNTIME, precision=a.precision,
                                path=a.path, metrics=a.metrics,
                                golden_atol=llm_golden_atol(a.precision, golden[a.id]))
                for a in artifacts]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        entries = _build_variants(tmp, variants, golden)
        _write_file(tmp / GOLDEN_NAME, _npz_bytes({"inputs": ids, **golden}))
        manifest = Manifest(
            model=name, version=version, task=TASK,
            inputs=(TensorSpec("input_ids", "int64", (1, None)),),
            outputs=(TensorSpec("logits", "float32", (1, spec.vocab_size)),),
            variants=entries, golden_file=GOLDEN_NAME,
            golden_sha256=sha256_file(tmp / GOLDEN_NAME),
            golden_size=(tmp / GOLDEN_NAME).stat().st_size, reference=dict(reference),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), llm=spec)
        finish_bundle(tmp, out, manifest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote language-model bundle %s v%d to %s", name, version, out)
    return out
