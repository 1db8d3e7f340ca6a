"""Board profiles as data (``devices/*.toml``) and their validation.

The agent imports this to pick a variant and a thread count; the converter to pick gates.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError
from agent.manifest import PRECISIONS, RUNTIMES

_REQUIRED = {
    "name": str, "description": str, "arch": str, "cores": int, "ram_mb": int,
    "cpu_features": list, "runtimes": list, "execution_providers": list,
    "preferred_precisions": list, "threads": int, "model_memory_budget_mb": int,
    "latency_budget_ms": float, "thermal_limit_c": float, "gates": dict,
}


@dataclass(frozen=True)
class Gates:
    max_accuracy_drop_points: float = 1.0
    min_agreement: float = 0.97


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str
    cores: int
    ram_mb: int
    cpu_features: tuple[str, ...]
    runtimes: tuple[str, ...]
    execution_providers: tuple[str, ...]
    preferred_precisions: tuple[str, ...]
    threads: int
    model_memory_budget_mb: int
    latency_budget_ms: float
    thermal_limit_c: float
    gates: Gates


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir()
                  if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (``rpi4``) or from a TOML file path."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigError(f"profile file {path} does not exist", key="profile")
        text = path.read_text()
    elif name_or_path in profile_names():
        text = (resources.files(__package__) / f"{name_or_path}.toml").read_text()
    else:
        raise ConfigError(f"unknown device profile {name_or_path!r}; known: "
                          f"{', '.join(profile_names())}", key="profile")
    return parse_profile(tomllib.loads(text), source=name_or_path)


def parse_profile(raw: dict, source: str = "<profile>") -> Profile:
    for key, typ in _REQUIRED.items():
        value = raw.get(key)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ConfigError(f"{source}: key {key!r} missing or not {typ.__name__}", key=key)
        raw[key] = value
    for prec in raw["preferred_precisions"]:
        if prec not in PRECISIONS:
            raise ConfigError(f"{source}: preferred_precisions has unknown {prec!r}",
                              key="preferred_precisions")
    for rt in raw["runtimes"]:
        if rt not in RUNTIMES:
            raise ConfigError(f"{source}: runtimes has unknown {rt!r}", key="runtimes")
    if raw["threads"] < 1:
        raise ConfigError(f"{source}: threads must be >= 1", key="threads")
    gates = Gates(**{k: float(v) for k, v in raw["gates"].items()})
    tuples = {k: tuple(raw[k]) for k in ("cpu_features", "runtimes", "execution_providers",
                                         "preferred_precisions")}
    return Profile(**{**raw, **tuples, "gates": gates})
