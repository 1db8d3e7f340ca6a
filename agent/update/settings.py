"""What the update machinery is told about the device and its limits (frozen settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeship.agent.health import HealthLimits


@dataclass(frozen=True)
class DeviceTraits:
    arch: str
    runtimes: tuple[str, ...]
    preferred_precisions: tuple[str, ...]
    threads: int
    providers: tuple[str, ...]
    latency_budget_ms: float | None = None
    hardware_classes: tuple[str, ...] = ()  # e.g. ("aarch64", "rpi4"); empty: (arch,)
    memory_budget_mb: float | None = None  # language models: weights + KV cache must fit


@dataclass(frozen=True)
class InstallSettings:
    trial_window_s: float = 30.0
    trial_min_requests: int = 20  # fewer requests than this in the window: rate not judged
    trial_max_error_rate: float = 0.05
    trial_max_crashes: int = 2  # agent restarts during one trial before it is reverted
    max_update_restarts: int = 3  # restarts before commit before the update is stopped
    max_attempts_per_version: int = 3  # announced installs of one version that failed
    health: HealthLimits = field(default_factory=HealthLimits)
    health_in_subprocess: bool = True
