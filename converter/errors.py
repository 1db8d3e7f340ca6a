"""Converter-side errors, all inside the one hierarchy rooted at ``agent.errors``.

They live here rather than in ``agent/errors.py`` because the device never raises them;
they subclass the agent's classes so callers can catch ``EdgeshipError`` everywhere.
"""

from __future__ import annotations

from edgeship.agent.errors import ConfigError, EdgeshipError, Reason


class ExportError(EdgeshipError):
    """A model could not be exported to ONNX, or the exported file is unusable."""


class QuantizeError(EdgeshipError):
    """Static quantization failed or was given unusable calibration data."""


class EvaluationError(EdgeshipError):
    """A variant could not be loaded or run, or the evaluation inputs are inconsistent."""


class GateError(EdgeshipError):
    """A converted variant failed its accuracy/size/latency gate (host only)."""

    reason_code = Reason.BUNDLE_INVALID


class NoVariantPassedError(GateError):
    """Every variant failed its gate; ``failures`` maps variant id → reasons and
    ``reports`` holds each variant's measured report (``converter.pipeline.VariantReport``)."""

    def __init__(self, message: str, *, failures: dict[str, list[str]],
                 reports: tuple = ()) -> None:
        super().__init__(message)
        self.failures = failures
        self.reports = reports


class InputError(ConfigError):
    """What the user handed the converter (model file, data, shapes, profile) is unusable.
    The CLI reports it as one line and exits 2."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message, key=key)
