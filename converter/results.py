"""What a conversion reports: one :class:`VariantReport` per variant asked for (passed,
failed its gate, could not be made, or skipped) and the :class:`ConvertResult`."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edgeship.agent.manifest import Manifest
from edgeship.converter.errors import NoVariantPassedError
from edgeship.converter.evaluate import VariantMetrics
from edgeship.converter.gates import GateFailure


@dataclass(frozen=True)
class VariantReport:
    id: str
    runtime: str
    precision: str
    metrics: VariantMetrics | None = None
    failures: tuple[GateFailure, ...] = ()
    notes: dict = field(default_factory=dict)  # e.g. nodes kept in float by the fallback
    error: str | None = None  # could not be made or measured (one line)
    stage: str | None = None  # where it stopped: skipped, make, evaluate

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures

    def failure_lines(self) -> list[str]:
        if self.error is not None:
            return [self.error]
        return [str(f) for f in self.failures]

    def reasons(self) -> list[dict]:
        """Structured reasons: the gates missed (gate, output, measured, limit) or the error."""
        if self.error is not None:
            return [{"gate": "error", "stage": self.stage, "error": self.error}]
        return [f.to_dict() for f in self.failures]

    def to_dict(self) -> dict:
        return {"id": self.id, "runtime": self.runtime, "precision": self.precision,
                "passed": self.passed, "failures": self.failure_lines(),
                "reasons": self.reasons(),
                "metrics": self.metrics.to_dict() if self.metrics else None,
                "outputs": [o.to_dict() for o in self.metrics.outputs] if self.metrics
                else [], "notes": dict(self.notes)}


@dataclass(frozen=True)
class ConvertResult:
    bundle_dir: Path
    manifest: Manifest
    reports: tuple[VariantReport, ...]
    reference_accuracy: float | None
    task: str = "classification"
    accuracy_measured: bool = True  # False: no data was given, inputs were synthesized
    warnings: tuple[str, ...] = ()

    @property
    def shipped(self) -> tuple[str, ...]:
        return tuple(v.id for v in self.manifest.variants)

    def to_dict(self) -> dict:
        return {"bundle_dir": str(self.bundle_dir), "model": self.manifest.model,
                "version": self.manifest.version, "task": self.task,
                "shipped": list(self.shipped),
                "reference_accuracy": self.reference_accuracy,
                "accuracy_measured": self.accuracy_measured,
                "warnings": list(self.warnings),
                "variants": [r.to_dict() for r in self.reports]}


def refuse(reports: Sequence[VariantReport]) -> NoVariantPassedError:
    failures = {r.id: r.failure_lines() for r in reports}
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in failures.items())
    return NoVariantPassedError(f"no variant passed ({detail})", failures=failures,
                                reports=tuple(reports))


def measured_on(threads: int) -> dict[str, str]:
    """Where latency was measured: the devices compare like with like."""
    cpu = ""
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not cpu:
                    cpu = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm",
              "sve")
    return {"arch": platform.machine(), "cpu": cpu or platform.processor() or "unknown",
            "threads": str(threads), "cpu_count": str(os.cpu_count() or 0),
            "features": ",".join(f for f in wanted if f in flags)}
