"""Quality gates: a variant that fails any threshold is not shipped. Pure functions.

Every output is held to the gate (cosine, SNR when asked for, exact equality for integer
outputs); the argmax agreement applies to the outputs where the task gives it a meaning,
the accuracy drop only where labels were given. All failures are collected, each as a
structured :class:`GateFailure` (gate, output, measured, limit).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeship.agent.errors import ConfigError


@dataclass(frozen=True)
class Gate:
    max_accuracy_drop_points: float = 1.0
    min_agreement: float = 0.97
    min_cosine: float = 0.99
    max_size_bytes: int | None = None
    max_latency_p99_ms: float | None = None
    min_snr_db: float | None = None

    def __post_init__(self) -> None:
        if self.max_accuracy_drop_points < 0:
            raise ConfigError(f"max_accuracy_drop_points must be >= 0, got "
                              f"{self.max_accuracy_drop_points}",
                              key="max_accuracy_drop_points")
        for key in ("min_agreement", "min_cosine"):
            value = getattr(self, key)
            if not -1.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be within [-1, 1], got {value}", key=key)


@dataclass(frozen=True)
class GateFailure:
    """One missed threshold; ``str()`` is the line users read."""

    gate: str  # accuracy_drop, agreement, cosine, snr_db, shape, exact, size, latency_p99
    measured: float
    limit: float
    output: str | None = None
    unit: str = ""

    def __str__(self) -> str:
        where = f"[{self.output}]" if self.output else ""
        if self.gate == "shape":
            return f"output {self.output} has another shape than the source model's"
        op = ">" if self.gate in ("accuracy_drop", "size", "latency_p99") else "<"
        return (f"{self.gate}{where} {self.measured:.6g}{self.unit} {op} "
                f"{self.limit:.6g}{self.unit}")

    def to_dict(self) -> dict:
        return {"gate": self.gate, "output": self.output, "measured": self.measured,
                "limit": self.limit}


def check_gate(metrics, gate: Gate) -> list[GateFailure]:
    """Every threshold ``metrics`` (a ``VariantMetrics``) misses; empty means pass."""
    failures = _output_failures(metrics, gate)
    if metrics.accuracy_drop is not None and \
            metrics.accuracy_drop > gate.max_accuracy_drop_points:
        failures.append(GateFailure("accuracy_drop", metrics.accuracy_drop,
                                    gate.max_accuracy_drop_points, unit=" pt"))
    if gate.max_size_bytes is not None and metrics.size_bytes > gate.max_size_bytes:
        failures.append(GateFailure("size", metrics.size_bytes, gate.max_size_bytes,
                                    unit=" B"))
    if (gate.max_latency_p99_ms is not None
            and metrics.latency_p99_ms > gate.max_latency_p99_ms):
        failures.append(GateFailure("latency_p99", metrics.latency_p99_ms,
                                    gate.max_latency_p99_ms, unit=" ms"))
    return failures


def _output_failures(metrics, gate: Gate) -> list[GateFailure]:
    out: list[GateFailure] = []
    for o in metrics.outputs:
        if not o.shape_ok:
            out.append(GateFailure("shape", 0.0, 1.0, o.name))
            continue
        if o.exact:
            if o.agreement is not None and o.agreement < gate.min_agreement:
                out.append(GateFailure("exact", o.agreement, gate.min_agreement, o.name))
            continue
        if o.cosine < gate.min_cosine:
            out.append(GateFailure("cosine", o.cosine, gate.min_cosine, o.name))
        if o.agreement is not None and o.agreement < gate.min_agreement:
            out.append(GateFailure("agreement", o.agreement, gate.min_agreement, o.name))
        if gate.min_snr_db is not None and o.snr_db < gate.min_snr_db:
            out.append(GateFailure("snr_db", o.snr_db, gate.min_snr_db, o.name, " dB"))
    return out
