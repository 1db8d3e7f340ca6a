"""Board profiles as data (``devices/*.toml``) and their validation (``devices.schema``).

The agent imports this to pick a variant and a thread count; the converter to pick gates;
``edgeship devices detect`` to say which board it runs on. Needs no torch and no fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeship.agent.errors import ConfigError
from edgeship.common.compat import tomllib
from edgeship.devices.schema import DETECT, GATES, TOP_LEVEL, check_consistency, check_table


@dataclass(frozen=True)
class Gates:
    """What the converter demands of a variant before it may ship to this board
    (the same names as ``converter.gates.Gate``)."""

    max_accuracy_drop_points: float = 1.0
    min_agreement: float = 0.97
    min_cosine: float = 0.99
    max_model_mb: float | None = None
    max_latency_p99_ms: float | None = None


@dataclass(frozen=True)
class DetectRules:
    """How ``edgeship devices detect`` recognises the board."""

    models: tuple[str, ...] = ()
    tegra_releases: tuple[str, ...] = ()
    fallback: bool = False


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
    thermal_throttle_c: float
    thermal_limit_c: float
    gates: Gates
    detect: DetectRules
    latency_scale: float | None = None
    variant_choice: str | None = None  # None: "profile" with a GPU provider, else "measured"

    @property
    def uses_measurements(self) -> bool:
        """Whether the converter's latency measurements steer the choice of variant: by
        default only on CPU-only boards (host CPU timings say little about a GPU/NPU)."""
        if self.variant_choice is not None:
            return self.variant_choice == "measured"
        return all(p == "CPUExecutionProvider" for p in self.execution_providers)


#: the profiles ship beside this file (a plain path, not importlib.resources: its readers
#: import zipfile, ~0.3 MB in every agent)
_HERE = Path(__file__).parent


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in _HERE.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (``rpi4``) or from a TOML file path."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigError(f"profile file {path} does not exist", key="profile")
        text, source = path.read_text(), str(path)
    elif name_or_path in profile_names():
        text = (_HERE / f"{name_or_path}.toml").read_text()
        source = f"devices/{name_or_path}.toml"
    else:
        raise ConfigError(f"unknown device profile {name_or_path!r}; known: "
                          f"{', '.join(profile_names())}", key="profile")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}", key="profile") from e
    profile = parse_profile(raw, source=source)
    stem = Path(source).stem
    if profile.name != stem:
        raise ConfigError(f"{source}: key 'name' must match the file name ({stem!r}), got "
                          f"{profile.name!r}", key="name")
    return profile


def load_all() -> list[Profile]:
    return [load_profile(n) for n in profile_names()]


def parse_profile(raw: dict, source: str = "<profile>") -> Profile:
    """Validate a parsed profile against ``devices.schema``; ConfigError names the key."""
    v = check_table(raw, TOP_LEVEL, source)
    check_consistency(v, source)
    gates = check_table(v["gates"], GATES, source, prefix="gates.")
    detect = check_table(v["detect"], DETECT, source, prefix="detect.")
    tuples = {k: tuple(v[k]) for k in ("cpu_features", "runtimes", "execution_providers",
                                       "preferred_precisions")}
    return Profile(**{**v, **tuples, "gates": Gates(**gates),
                      "detect": DetectRules(**{k: tuple(x) if isinstance(x, list) else x  # type: ignore[arg-type]
                                               for k, x in detect.items()})})
