"""The board-profile schema: which keys a ``devices/*.toml`` file has, their types and ranges.

Pure: takes the parsed TOML dict and either returns checked values or raises ConfigError
naming the file and the key (``rpi4.toml: key 'threads' must be <= cores (4), got 8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeship.agent.errors import ConfigError, did_you_mean
from edgeship.agent.manifest import PRECISIONS, RUNTIMES

ARCHES = ("x86_64", "aarch64", "armv7l")
EXECUTION_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider",
                       "TensorrtExecutionProvider", "XnnpackExecutionProvider",
                       "ArmNNExecutionProvider", "ACLExecutionProvider",
                       "OpenVINOExecutionProvider")


@dataclass(frozen=True)
class Key:
    """One key: its type, whether it must be there, and its allowed range or values."""

    typ: type
    required: bool = True
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None  # for str, or for each item of a list[str]


TOP_LEVEL: dict[str, Key] = {
    "name": Key(str),
    "description": Key(str),
    "arch": Key(str, choices=ARCHES),
    "cores": Key(int, min=1, max=256),
    "ram_mb": Key(int, min=128, max=4 * 1024 * 1024),
    "cpu_features": Key(list),
    "runtimes": Key(list, choices=RUNTIMES),
    "execution_providers": Key(list, choices=EXECUTION_PROVIDERS),
    "preferred_precisions": Key(list, choices=PRECISIONS),
    "threads": Key(int, min=1, max=256),
    "model_memory_budget_mb": Key(int, min=1),
    "latency_budget_ms": Key(float, min=0.01, max=60_000),
    "thermal_throttle_c": Key(float, min=30, max=125),
    "thermal_limit_c": Key(float, min=30, max=125),
    "gates": Key(dict),
    "detect": Key(dict),
}

GATES: dict[str, Key] = {
    "max_accuracy_drop_points": Key(float, min=0, max=100),
    "min_agreement": Key(float, min=0, max=1),
    "min_cosine": Key(float, required=False, min=-1, max=1),
    "max_model_mb": Key(float, required=False, min=0.001),
    "max_latency_p99_ms": Key(float, required=False, min=0.01),
}

DETECT: dict[str, Key] = {
    # substrings of /proc/device-tree/model (or the cpuinfo 'Model' line) that mean this board
    "models": Key(list, required=False),
    # Jetson: the L4T major release in /etc/nv_tegra_release (e.g. "R32" = JetPack 4)
    "tegra_releases": Key(list, required=False),
    # the last resort for this arch when nothing more specific matched
    "fallback": Key(bool, required=False),
}


def check_table(raw: Any, schema: dict[str, Key], source: str, prefix: str = "") -> dict:
    """Every key of ``raw`` known, of the right type and in range; returns coerced values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'profile'} must be a table",
                          key=prefix.rstrip(".") or "profile")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix + unknown[0]!r}"
                          f"{did_you_mean(unknown[0], schema)} (known: "
                          f"{', '.join(sorted(schema))})", key=prefix + unknown[0])
    out = {}
    for name, key in schema.items():
        if name not in raw:
            if key.required:
                raise ConfigError(f"{source}: missing required key {prefix + name!r}",
                                  key=prefix + name)
            continue
        out[name] = _check_value(raw[name], key, source, prefix + name)
    return out


def _check_value(value: Any, key: Key, source: str, name: str) -> Any:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{source}: key {name!r} {why}, got {value!r}", key=name)

    if key.typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, key.typ) or (isinstance(value, bool) and key.typ is not bool):
        raise bad(f"must be a {_TYPE_NAMES.get(key.typ, key.typ.__name__)}")
    if key.min is not None and isinstance(value, (int, float)) and value < key.min:
        raise bad(f"must be >= {key.min:g}")
    if key.max is not None and isinstance(value, (int, float)) and value > key.max:
        raise bad(f"must be <= {key.max:g}")
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise bad("must be a list of strings")
        if len(set(value)) != len(value):
            raise bad("has duplicates")
        if key.choices is not None:
            for v in value:
                if v not in key.choices:
                    raise bad(f"has unknown {v!r} (known: {', '.join(key.choices)})")
    elif key.choices is not None and value not in key.choices:
        raise bad(f"must be one of {', '.join(key.choices)}")
    return value


_TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "list", dict: "table",
               bool: "boolean"}


def check_consistency(v: dict, source: str) -> None:
    """Rules that relate keys to each other."""
    rules = [
        (v["threads"] <= v["cores"], "threads", f"must be <= cores ({v['cores']})"),
        (v["model_memory_budget_mb"] < v["ram_mb"], "model_memory_budget_mb",
         f"must be < ram_mb ({v['ram_mb']})"),
        (v["thermal_throttle_c"] < v["thermal_limit_c"], "thermal_throttle_c",
         f"must be < thermal_limit_c ({v['thermal_limit_c']:g})"),
        (bool(v["preferred_precisions"]), "preferred_precisions", "must not be empty"),
        (bool(v["runtimes"]), "runtimes", "must not be empty"),
        ("CPUExecutionProvider" in v["execution_providers"], "execution_providers",
         "must include CPUExecutionProvider (the fallback every onnxruntime has)"),
    ]
    for ok, key, why in rules:
        if not ok:
            raise ConfigError(f"{source}: key {key!r} {why}, got {v[key]!r}", key=key)
