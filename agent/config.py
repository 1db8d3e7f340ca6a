"""Agent settings: one frozen dataclass, loaded from TOML once at the entry point."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.agent.errors import ConfigError
from edgeship.agent.health import HealthLimits
from edgeship.agent.spool import SpoolSettings
from edgeship.agent.telemetry import TelemetrySettings
from edgeship.agent.update.settings import InstallSettings
from edgeship.agent.update.transfer import TransferSettings
from edgeship.common.config import read_toml, typed_values
from edgeship.common.mqtt_types import RECONNECT_MAX_S, RECONNECT_MIN_S
from edgeship.agent.protocol import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, validate_id

_INSTALL = InstallSettings()


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    profile: str = "generic-x86_64"
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    api_enabled: bool = True  # false: no TCP API (e.g. many simulated agents per process)
    telemetry_interval_s: float = TelemetrySettings.interval_s
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    transfer_timeout_s: float = TransferSettings.request_timeout_s
    max_model_bytes: int = 512 * 1024 * 1024
    max_request_bytes: int = 0  # API body cap for every model; 0 = from each model's inputs
    transfer_max_bytes_per_s: int = 0  # per-device download rate cap; 0 = unlimited
    transport: str = "mqtt"  # how updates are fetched: "mqtt" (the fleet server) | "http"
    http_base_url: str = ""  # transport "http": the repository's URL (metadata/, targets/)
    threads: int = 0  # 0 = from the device profile
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    mqtt_username: str | None = None  # log in with a user name and password ...
    mqtt_password_file: str | None = None  # ... read from this file (first line), never argv
    mqtt_client_id: str = ""  # "" = edgeship-agent-<device_id>
    # --- agent runtime ---
    api_socket: str | None = None  # Unix socket for the local API; None = <state_dir>/api.sock, "" = off
    metrics_port: int = 0  # Prometheus endpoint on api_host; 0 = off
    # --- local API bounds and gRPC ---
    api_body_samples: int = 8  # derived body cap: this many samples of the model's inputs
    api_max_connections: int = 32  # per listener; past it: 503 (the other listener serves)
    api_idle_timeout_s: float = 10.0  # a kept-alive connection with no request is closed
    grpc_enabled: bool = False  # gRPC API (pip install 'edgeship[grpc]'; ~25 MB more RSS)
    grpc_socket: str | None = None  # None = <state_dir>/grpc.sock, "" = no socket
    grpc_port: int = 0  # gRPC on grpc_host:grpc_port too; 0 = off
    grpc_host: str = "127.0.0.1"
    spool_max_records: int = SpoolSettings.max_records  # kept offline (oldest evicted)
    spool_max_dead_letters: int = SpoolSettings.max_dead_letters
    reconnect_min_s: float = RECONNECT_MIN_S
    reconnect_max_s: float = RECONNECT_MAX_S
    log_level: str = "info"
    # --- safe install (defaults: agent.update.settings, defined there once) ---
    trial_window_s: float = _INSTALL.trial_window_s  # live-traffic trial; 0 = none
    trial_min_requests: int = _INSTALL.trial_min_requests
    trial_max_error_rate: float = _INSTALL.trial_max_error_rate
    trial_max_crashes: int = _INSTALL.trial_max_crashes  # restarts in one trial: reverted
    max_update_restarts: int = _INSTALL.max_update_restarts  # in one install: stopped
    health_timeout_s: float = HealthLimits.timeout_s
    health_max_memory_mb: int = 0  # 0 = the device profile's model_memory_budget_mb
    # --- model quality in the field: feedback, drift, label-free estimate ---
    quality_enabled: bool = True  # request ids, drift sketches, feedback (agent.quality)
    quality_window_samples: int = 2048  # live samples a drift window covers (8 blocks)
    feedback_memory_samples: int = 8192  # predictions waiting in memory for the disk
    feedback_disk_samples: int = 100_000  # predictions kept on disk for feedback (~60 B each)
    # --- language models (OpenAI-compatible endpoints): admission ---
    llm_max_active: int = 1  # generations at once; each holds a KV cache
    llm_max_queued: int = 4  # requests waiting for a slot; past it: 429
    llm_queue_timeout_s: float = 60.0  # a wait longer than this: 503
    # --- bounds and the environment's faults ---
    max_models: int = 32  # models a device keeps; more (signed) ones: too_many_models
    resource_retry_min_s: float = 30.0  # disk full / no descriptors: first retry after
    resource_retry_max_s: float = 900.0  # ... doubling (jittered) up to this

    def mqtt_password(self) -> str | None:
        """The password from ``mqtt_password_file`` (its first line), read when asked."""
        if not self.mqtt_password_file:
            return None
        return read_secret(self.mqtt_password_file, "mqtt_password_file")

    @property
    def api_socket_path(self) -> Path | None:
        if self.api_socket == "":
            return None
        return Path(self.api_socket) if self.api_socket else self.state_dir / "api.sock"

    @property
    def grpc_socket_path(self) -> Path | None:
        if self.grpc_socket == "":
            return None
        return Path(self.grpc_socket) if self.grpc_socket else self.state_dir / "grpc.sock"

    @property
    def spool_path(self) -> Path:
        return self.state_dir / "telemetry.db"

    @property
    def tuf_dir(self) -> Path:
        return self.state_dir / "tuf"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.state_dir / "downloads"

    @property
    def updates_dir(self) -> Path:
        return self.state_dir / "updates"


_POSITIVE = ("telemetry_interval_s", "chunk_bytes", "transfer_timeout_s", "max_model_bytes",
             "api_body_samples", "api_max_connections", "api_idle_timeout_s",
             "spool_max_records", "spool_max_dead_letters",
             "reconnect_min_s", "reconnect_max_s", "health_timeout_s", "trial_max_crashes",
             "max_update_restarts", "quality_window_samples", "feedback_memory_samples",
             "feedback_disk_samples", "max_models", "resource_retry_min_s",
             "resource_retry_max_s", "llm_max_active", "llm_queue_timeout_s")


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> AgentConfig:
    values = typed_values(AgentConfig, raw, source, required=("device_id", "state_dir"))
    try:
        validate_id(values["device_id"])
    except Exception as e:
        raise ConfigError(f"{source}: key 'device_id': {e}", key="device_id") from e
    for key in _POSITIVE:
        if key in values and values[key] <= 0:
            raise ConfigError(f"{source}: key {key!r} must be > 0", key=key)
    if values.get("llm_max_queued", 0) < 0:
        raise ConfigError(f"{source}: key 'llm_max_queued' must be >= 0", key="llm_max_queued")
    if values.get("chunk_bytes", 1) > MAX_CHUNK_BYTES:
        raise ConfigError(f"{source}: key 'chunk_bytes' must be <= {MAX_CHUNK_BYTES}",
                          key="chunk_bytes")
    _check_runtime_keys(values, source)
    _check_transport(values, source)
    if values.get("mqtt_password_file") and not values.get("mqtt_username"):
        raise ConfigError(f"{source}: key 'mqtt_password_file' needs 'mqtt_username'",
                          key="mqtt_username")
    return AgentConfig(**values)


def read_secret(path: str | Path, key: str) -> str:
    """The first line of a secret file (a password), without its line break."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{key} {path}: {e.strerror or e}", key=key) from e
    secret = text.split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise ConfigError(f"{key} {path}: the file is empty", key=key)
    return secret


def _check_transport(values: dict[str, Any], source: str) -> None:
    """Issue 3: ``transport = "http"`` fetches metadata and targets from ``http_base_url``
    (a CDN or any static server of the repository directory); MQTT still carries the rest."""
    transport = values.get("transport", "mqtt")
    if transport not in ("mqtt", "http"):
        raise ConfigError(f"{source}: key 'transport' must be \"mqtt\" or \"http\", got "
                          f"{transport!r}", key="transport")
    url = values.get("http_base_url", "")
    if transport == "http" and not url:
        raise ConfigError(f"{source}: key 'http_base_url' is required with transport = "
                          "\"http\"", key="http_base_url")
    if url:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query \
                or parsed.fragment:
            raise ConfigError(f"{source}: key 'http_base_url' must be an http:// or https:// "
                              f"URL without query or fragment, got {url!r}",
                              key="http_base_url")


def _check_runtime_keys(values: dict[str, Any], source: str) -> None:
    if values.get("log_level", "info") not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{source}: key 'log_level' must be debug|info|warning|error",
                          key="log_level")
    for key in ("metrics_port", "grpc_port"):
        if not 0 <= values.get(key, 0) <= 65535:
            raise ConfigError(f"{source}: key {key!r} must be 0..65535", key=key)
    if values.get("max_request_bytes", 0) < 0:
        raise ConfigError(f"{source}: key 'max_request_bytes' must be >= 0 (0: derived from "
                          "each model's input size)", key="max_request_bytes")
    if values.get("reconnect_min_s", RECONNECT_MIN_S) > values.get("reconnect_max_s",
                                                                   RECONNECT_MAX_S):
        raise ConfigError(f"{source}: key 'reconnect_min_s' must be <= reconnect_max_s",
                          key="reconnect_min_s")


def load_config(path: Path) -> AgentConfig:
    return config_from_dict(read_toml(path, "agent"), source=str(path))
