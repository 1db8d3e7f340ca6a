"""One exception hierarchy for edgeship, rooted at :class:`EdgeshipError`.

Every error that can reach the fleet carries a stable ``reason_code`` (see
:class:`Reason`). Foreign errors are wrapped at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

import errno
from typing import Iterable

from edgeship.common.compat import StrEnum


class Reason(StrEnum):
    """Stable reason codes published on a device's status topic. Never rename one."""

    MALFORMED_MESSAGE = "malformed_message"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_SIGNATURE = "bad_signature"
    HASH_MISMATCH = "hash_mismatch"
    LENGTH_MISMATCH = "length_mismatch"
    METADATA_EXPIRED = "metadata_expired"
    METADATA_INVALID = "metadata_invalid"
    INTERRUPTED = "interrupted"
    ROLLBACK = "rollback"
    NOT_FOUND = "not_found"
    TRANSFER_FAILED = "transfer_failed"
    TRANSFER_TIMEOUT = "transfer_timeout"
    BUNDLE_INVALID = "bundle_invalid"
    NO_COMPATIBLE_VARIANT = "no_compatible_variant"
    HEALTH_CHECK_FAILED = "health_check_failed"
    INSTALL_FAILED = "install_failed"
    STALE_ANNOUNCEMENT = "stale_announcement"
    BAD_REQUEST = "bad_request"
    CONFIG_INVALID = "config_invalid"
    INTERNAL = "internal_error"
    # safe install (issue 4): why an update was reverted
    HEALTH_CHECK_CRASHED = "health_check_crashed"
    HEALTH_CHECK_TIMEOUT = "health_check_timeout"
    HEALTH_CHECK_OUT_OF_MEMORY = "health_check_out_of_memory"
    NONFINITE_OUTPUT = "nonfinite_output"
    OUTPUT_SHAPE_MISMATCH = "output_shape_mismatch"
    GOLDEN_MISMATCH = "golden_mismatch"
    LATENCY_BUDGET_EXCEEDED = "latency_budget_exceeded"
    TRIAL_ERROR_RATE = "trial_error_rate"
    CRASH_LOOP = "crash_loop"
    RESTART_LOOP = "restart_loop"
    SHADOW_DISAGREEMENT = "shadow_disagreement"
    VERSION_BLOCKED = "version_blocked"
    # secure delivery (issue 3)
    HARDWARE_MISMATCH = "hardware_mismatch"
    RELEASE_STOPPED = "release_stopped"
    DELTA_MISMATCH = "delta_mismatch"
    # hardening: the environment's fault (retried later, never blamed on the model)
    DISK_FULL = "disk_full"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    # the manifest's inputs/outputs disagree with the model's own
    MODEL_SIGNATURE_MISMATCH = "model_signature_mismatch"
    # more models announced than a device keeps (signed, but over the bound)
    TOO_MANY_MODELS = "too_many_models"
    # a desired state older than one this device already follows
    STALE_DESIRED = "stale_desired"
    # language models
    MEMORY_BUDGET_EXCEEDED = "memory_budget_exceeded"
    TOKEN_MISMATCH = "token_mismatch"


#: Failures that are the environment's fault (the disk, file descriptors, memory), not the
#: model's: the update is retried later and the version never blocked for them.
ENVIRONMENT_FAULTS = frozenset({Reason.DISK_FULL, Reason.RESOURCE_EXHAUSTED})
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                               errno.EAGAIN})


def resource_reason(error: BaseException | None) -> Reason | None:
    """``disk_full`` / ``resource_exhausted`` when ``error`` or anything in its chain of
    causes is an ``OSError`` of a full disk or of exhausted descriptors or memory (or a
    ``MemoryError``); None otherwise."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError):
            return Reason.RESOURCE_EXHAUSTED
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return Reason.DISK_FULL
        if isinstance(error, OSError) and error.errno in _EXHAUSTED_ERRNOS:
            return Reason.RESOURCE_EXHAUSTED
        error = error.__cause__ or error.__context__
    return None


class EdgeshipError(Exception):
    """Base of every error edgeship raises on purpose."""

    reason_code: Reason = Reason.INTERNAL

    def __init__(self, message: str, *, reason_code: Reason | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(EdgeshipError):
    """A message on the wire is malformed, too large, or of an unknown schema."""

    reason_code = Reason.MALFORMED_MESSAGE


class BundleError(EdgeshipError):
    """A bundle or its manifest is invalid (layout, hashes, sizes)."""

    reason_code = Reason.BUNDLE_INVALID


class VerificationError(EdgeshipError):
    """Signed metadata or a downloaded file failed verification."""

    reason_code = Reason.BAD_SIGNATURE


class TransferError(EdgeshipError):
    """A file could not be fetched from the fleet."""

    reason_code = Reason.TRANSFER_FAILED

    def __init__(self, message: str, *, reason_code: Reason | None = None,
                 status: int | None = None) -> None:
        super().__init__(message, reason_code=reason_code)
        self.status = status


class HealthCheckError(EdgeshipError):
    """A staged model failed its health check; carries the largest deviation seen."""

    reason_code = Reason.HEALTH_CHECK_FAILED

    def __init__(self, message: str, *, max_abs_diff: float | None = None,
                 reason_code: Reason | None = None) -> None:
        super().__init__(message, reason_code=reason_code)
        self.max_abs_diff = max_abs_diff


class RuntimeLoadError(EdgeshipError):
    """A runtime could not load a model file (``agent.runtime.load_runtime``)."""

    reason_code = Reason.HEALTH_CHECK_FAILED


class InferenceInputError(EdgeshipError):
    """An inference request does not match the model's input signature."""

    reason_code = Reason.BAD_REQUEST


class ConfigError(EdgeshipError):
    """A configuration file or value is invalid; the message names the bad key."""

    reason_code = Reason.CONFIG_INVALID

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class TransitionError(ConfigError):
    """An event that does not apply in the current state of a state machine (a device's
    update, a fleet's rollout): the sender's mistake, or a damaged record."""


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
