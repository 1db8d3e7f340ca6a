"""Agent settings: one frozen dataclass, loaded from TOML once at the entry point."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.protocol import MAX_CHUNK_BYTES, validate_id


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    profile: str = "generic-x86_64"
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    telemetry_interval_s: float = 60.0
    chunk_bytes: int = 256 * 1024
    transfer_timeout_s: float = 10.0
    max_model_bytes: int = 512 * 1024 * 1024
    max_request_bytes: int = 16 * 1024 * 1024
    threads: int = 0  # 0 = from the device profile
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

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
             "max_request_bytes")


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> AgentConfig:
    fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}", key=unknown[0])
    for key in ("device_id", "state_dir"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r}", key=key)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = _coerce(key, value, fields[key].type, source)
    try:
        validate_id(values["device_id"])
    except Exception as e:
        raise ConfigError(f"{source}: key 'device_id': {e}", key="device_id") from e
    for key in _POSITIVE:
        if key in values and values[key] <= 0:
            raise ConfigError(f"{source}: key {key!r} must be > 0", key=key)
    if values.get("chunk_bytes", 1) > MAX_CHUNK_BYTES:
        raise ConfigError(f"{source}: key 'chunk_bytes' must be <= {MAX_CHUNK_BYTES}",
                          key="chunk_bytes")
    return AgentConfig(**values)


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    t = str(typ)
    try:
        if "Path" in t:
            return Path(str(value))
        if t.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: key {key!r} has a bad value {value!r} "
                          f"(expected {t})", key=key) from None


def load_config(path: Path) -> AgentConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    agent_section = raw.get("agent", raw)
    return config_from_dict(dict(agent_section), source=str(path))
