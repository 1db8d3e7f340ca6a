"""Which board profile matches this machine, and why.

``read_host_facts(root)`` is the only I/O: it reads /proc/device-tree/model, /proc/cpuinfo,
/etc/nv_tegra_release and /proc/meminfo under ``root`` (``/`` on a board, a fixture directory
in tests). ``detect(facts, profiles)`` is pure.

Order of evidence: a device-tree (or cpuinfo ``Model``) string naming the board, then the L4T
release of a Jetson, then the architecture's generic profile. Mismatches in RAM, cores or CPU
features never change the answer; they are reported as warnings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edgeship.agent.capabilities import machine
from edgeship.devices import Profile

_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "armv8l": "aarch64"}


@dataclass(frozen=True)
class HostFacts:
    arch: str
    model: str | None = None          # /proc/device-tree/model or cpuinfo "Model"
    model_source: str | None = None
    tegra_release: str | None = None  # "R32" from /etc/nv_tegra_release
    tegra_line: str | None = None
    cores: int | None = None
    ram_mb: int | None = None
    cpu_features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Detection:
    profile: str
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    facts: HostFacts | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        f = self.facts
        return {"profile": self.profile, "reasons": list(self.reasons),
                "warnings": list(self.warnings),
                "facts": None if f is None else {
                    "arch": f.arch, "model": f.model, "model_source": f.model_source,
                    "tegra_release": f.tegra_release, "cores": f.cores, "ram_mb": f.ram_mb,
                    "cpu_features": sorted(f.cpu_features)}}


# --- I/O -----------------------------------------------------------------------------------

def _read(path: Path, limit_bytes: int = 256 * 1024) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit_bytes).decode("utf-8", "replace")
    except OSError:
        return None


def read_host_facts(root: Path = Path("/"), arch: str | None = None) -> HostFacts:
    """Gather the facts; ``arch`` defaults to ``root/arch`` (fixtures) or ``uname -m``."""
    arch = arch or (_read(root / "arch") or "").strip() or machine()
    arch = _ARCH_ALIASES.get(arch, arch)
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    model, source = None, None
    dt = _read(root / "proc/device-tree/model")
    if dt and dt.strip("\x00\n "):
        model, source = dt.strip("\x00\n "), "/proc/device-tree/model"
    else:
        m = re.search(r"^Model\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            model, source = m.group(1).strip(), "/proc/cpuinfo"
    tegra = _read(root / "etc/nv_tegra_release")
    release = None
    if tegra:
        m = re.search(r"#\s*(R\d+)", tegra)
        release = m.group(1) if m else None
    return HostFacts(arch=arch, model=model, model_source=source, tegra_release=release,
                     tegra_line=tegra.splitlines()[0].strip() if tegra else None,
                     cores=_cores(cpuinfo, root), ram_mb=_ram_mb(_read(root / "proc/meminfo")),
                     cpu_features=_features(cpuinfo))


def _cores(cpuinfo: str, root: Path) -> int | None:
    n = len(re.findall(r"^processor\s*:", cpuinfo, re.M))
    if n:
        return n
    return os.cpu_count() if root == Path("/") else None


def _ram_mb(meminfo: str | None) -> int | None:
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo or "", re.M)
    return int(m.group(1)) // 1024 if m else None


def _features(cpuinfo: str) -> frozenset[str]:
    m = re.search(r"^(?:Features|flags)\s*:\s*(.*)$", cpuinfo, re.M)
    return frozenset(m.group(1).split()) if m else frozenset()


# --- pure matching ------------------------------------------------------------------------

def detect(facts: HostFacts, profiles: Sequence[Profile]) -> Detection | None:
    """The best profile for ``facts`` with the reasons, or None when nothing fits."""
    same_arch = [p for p in profiles if p.arch == facts.arch]
    for rule in (_by_model, _by_tegra, _by_fallback):
        hit = rule(facts, same_arch)
        if hit is not None:
            profile, reasons = hit
            reasons = (f"architecture is {facts.arch}",) + reasons
            return Detection(profile.name, reasons, _warnings(facts, profile), facts)
    return None


def _by_model(facts: HostFacts, profiles: Sequence[Profile]):
    if not facts.model:
        return None
    # longest pattern first, so "Raspberry Pi 400" beats "Raspberry Pi 4" and so on
    pairs = sorted(((pat, p) for p in profiles for pat in p.detect.models),
                   key=lambda x: -len(x[0]))
    for pattern, p in pairs:
        if pattern.lower() in facts.model.lower():
            return p, (f"{facts.model_source} says {facts.model!r}, which contains "
                       f"{pattern!r}",)
    return None


def _by_tegra(facts: HostFacts, profiles: Sequence[Profile]):
    if not facts.tegra_release:
        return None
    for p in profiles:
        if facts.tegra_release in p.detect.tegra_releases:
            return p, (f"/etc/nv_tegra_release is L4T {facts.tegra_release} "
                       f"({facts.tegra_line!r})",)
    return None


def _by_fallback(facts: HostFacts, profiles: Sequence[Profile]):
    for p in profiles:
        if p.detect.fallback:
            why = (f"no board-specific match (model {facts.model!r}); using the generic "
                   f"{facts.arch} profile")
            return p, (why,)
    return None


def _warnings(facts: HostFacts, p: Profile) -> tuple[str, ...]:
    out = []
    if facts.ram_mb is not None and facts.ram_mb < p.model_memory_budget_mb * 2:
        out.append(f"only {facts.ram_mb} MB RAM for a model budget of "
                   f"{p.model_memory_budget_mb} MB: lower it with a custom profile")
    if facts.cores is not None and facts.cores < p.threads:
        out.append(f"{facts.cores} cores < the profile's {p.threads} threads: set "
                   "'threads' in the agent config")
    if facts.cpu_features:
        missing = sorted(set(p.cpu_features) - facts.cpu_features)
        if missing:
            out.append(f"CPU lacks {', '.join(missing)} that {p.name} expects")
    return tuple(out)
