"""Quality gates: a variant that fails any threshold is not shipped. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from edgeship.agent.errors import ConfigError
from edgeship.converter.evaluate import VariantMetrics


@dataclass(frozen=True)
class Gate:
    max_accuracy_drop_points: float = 1.0
    min_agreement: float = 0.97
    min_cosine: float = 0.99
    max_size_bytes: int | None = None
    max_latency_p99_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_accuracy_drop_points < 0:
            raise ConfigError(f"max_accuracy_drop_points must be >= 0, got "
                              f"{self.max_accuracy_drop_points}",
                              key="max_accuracy_drop_points")
        for key in ("min_agreement", "min_cosine"):
            value = getattr(self, key)
            if not -1.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be within [-1, 1], got {value}", key=key)


def check_gate(metrics: VariantMetrics, gate: Gate) -> list[str]:
    """Every threshold ``metrics`` misses, one readable line each; empty means pass."""
    failures = []
    if metrics.accuracy_drop > gate.max_accuracy_drop_points:
        failures.append(f"accuracy drop {metrics.accuracy_drop:.3g} pt > "
                        f"{gate.max_accuracy_drop_points:.3g} pt")
    if metrics.agreement < gate.min_agreement:
        failures.append(f"agreement {metrics.agreement:.6g} < {gate.min_agreement:.6g}")
    if metrics.cosine < gate.min_cosine:
        failures.append(f"cosine {metrics.cosine:.10g} < {gate.min_cosine:.10g}")
    if gate.max_size_bytes is not None and metrics.size_bytes > gate.max_size_bytes:
        failures.append(f"size {metrics.size_bytes} B > {gate.max_size_bytes} B")
    if (gate.max_latency_p99_ms is not None
            and metrics.latency_p99_ms > gate.max_latency_p99_ms):
        failures.append(f"p99 latency {metrics.latency_p99_ms:.3f} ms > "
                        f"{gate.max_latency_p99_ms:.3f} ms")
    return failures
