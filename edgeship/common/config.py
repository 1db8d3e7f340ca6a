"""Typed settings from TOML, shared by host and device: read a file once at the entry point,
check its keys against a frozen dataclass and coerce each value to the field's type, with
one-line errors naming the file, the key and the bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgeship.agent.errors import ConfigError, did_you_mean
from edgeship.common.compat import tomllib


def read_toml(path: Path, section: str | None = None) -> dict[str, Any]:
    """The table ``section`` of a TOML file (the whole file when it has no such table)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    table = raw.get(section, raw) if section else raw
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] is not a table", key=section)
    return dict(table)


def typed_values(cls: type, raw: dict[str, Any], source: str,
                 required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``raw`` checked against the fields of dataclass ``cls``: no unknown key, every
    ``required`` key present, each value of its field's type (ints widen to floats)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}"
                          f"{did_you_mean(unknown[0], fields)}", key=unknown[0])
    for key in required:
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r}", key=key)
    return {key: coerce(key, value, fields[key].type, source) for key, value in raw.items()}


def coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    """``value`` as the annotated type ``typ`` (a string under ``from __future__ import
    annotations``): Path, float, bool, int or str; anything else is a ConfigError."""
    t = str(typ)
    try:
        if "Path" in t:
            return Path(str(value))
        if t.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
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
