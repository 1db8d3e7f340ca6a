"""What this device can do, detected on start, and what the agent would pick with it.

Parsing (``parse_cpuinfo``, ``parse_meminfo_mb``) and the decision (``plan``) are pure;
``detect()`` does the reading: ``/proc/cpuinfo``, ``/proc/meminfo``, NVIDIA device nodes and
Jetson release files, onnxruntime's providers and the installed LiteRT package.
"""

from __future__ import annotations

import os
import platform
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgeship.agent.runtime import (KNOWN_PROVIDERS, available_onnx_providers, available_runtimes,
                           choose_providers, litert_backend)

#: CPU flags that change which variant is fastest (int8 dot products, fp16 arithmetic).
INT8_FEATURES_ARM = ("asimddp", "i8mm")
INT8_FEATURES_X86 = ("avx2", "avx512_vnni", "avx_vnni", "avx512bw")
FP16_FEATURES = ("fphp", "asimdhp", "avx512_fp16")
REPORTED_FEATURES = ("neon", "asimd", "asimddp", "i8mm", "fphp", "asimdhp", "bf16", "sve",
                     "sse4_2", "avx", "fma", "f16c", "avx2", "avx512f", "avx512bw",
                     "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_int8")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class Capabilities:
    arch: str
    cores: int
    ram_mb: int
    cpu_model: str
    cpu_features: tuple[str, ...]  # the REPORTED_FEATURES this CPU has
    gpu: str | None  # "nvidia", "nvidia-jetson" or None
    onnx_providers: tuple[str, ...]
    runtimes: tuple[str, ...]
    litert_backend: str | None
    numpy_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """What the agent will use: providers, runtimes, precision order and threads."""

    providers: tuple[str, ...]
    runtimes: tuple[str, ...]
    precisions: tuple[str, ...]
    threads: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure ---------------------------------------------------------------------------------

def parse_cpuinfo(text: str) -> tuple[set[str], str]:
    """``/proc/cpuinfo`` → (flags, model name). x86 lists ``flags``, Arm ``Features``."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key in ("model name", "hardware", "model", "cpu model") and not model and \
                not value.strip().isdigit():  # x86 "model : 85" is a number, not a name
            model = value.strip()
    if "asimd" in flags:
        flags.add("neon")  # AArch64 always has Advanced SIMD; Pi tooling calls it neon
    return flags, model


def parse_meminfo_mb(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def has_int8_acceleration(caps: Capabilities) -> bool:
    features = set(caps.cpu_features)
    if caps.arch in ("aarch64", "arm64", "armv7l"):
        return bool(features & {"asimd", "neon", *INT8_FEATURES_ARM})
    return bool(features & set(INT8_FEATURES_X86))


def plan(caps: Capabilities, *, profile_providers: Iterable[str],
         profile_runtimes: Iterable[str], profile_precisions: Iterable[str],
         profile_threads: int, threads_override: int = 0) -> Plan:
    """Choose providers, runtimes, the precision order and the thread count (pure).

    fp16 goes first only when a GPU provider is usable; on a CPU it goes last (onnxruntime
    and LiteRT mostly up-cast fp16 on CPUs). int8 goes behind fp32 on a CPU with no int8
    SIMD, where quantised kernels are slower than float ones."""
    notes: list[str] = []
    providers = choose_providers(tuple(profile_providers) or KNOWN_PROVIDERS,
                                 caps.onnx_providers)
    gpu = any(p in GPU_PROVIDERS for p in providers)
    precisions = list(dict.fromkeys(profile_precisions))
    if gpu and "fp16" in precisions:
        precisions.remove("fp16")
        precisions.insert(0, "fp16")
        notes.append(f"fp16 first: {providers[0]} is available")
    elif not gpu and "fp16" in precisions:
        precisions.remove("fp16")
        precisions.append("fp16")
        notes.append("fp16 last: no GPU execution provider")
    if not gpu and not has_int8_acceleration(caps):
        ints = [p for p in precisions if p.startswith("int8")]
        precisions = [p for p in precisions if not p.startswith("int8")] + ints
        notes.append("int8 after fp32: no int8 SIMD on this CPU")
    runtimes = tuple(r for r in profile_runtimes if r in caps.runtimes) or \
        tuple(r for r in ("onnxruntime",) if r in caps.runtimes)
    threads = threads_override or max(1, min(profile_threads, caps.cores))
    if not threads_override and profile_threads > caps.cores:
        notes.append(f"threads capped at {caps.cores} cores (profile says "
                     f"{profile_threads})")
    return Plan(providers=providers, runtimes=runtimes, precisions=tuple(precisions),
                threads=threads, notes=tuple(notes))


# --- I/O ------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def machine() -> str:
    """The architecture of this Python's userland. 32-bit Raspberry Pi OS on a 64-bit kernel
    says ``aarch64`` in ``uname -m`` but runs armv7l programs (and wheels)."""
    arch = platform.machine()
    if arch in ("aarch64", "arm64", "armv8l") and struct.calcsize("P") == 4:
        return "armv7l"
    return arch


def detect_gpu() -> str | None:
    if Path("/etc/nv_tegra_release").exists() or \
            "tegra" in _read("/proc/device-tree/compatible").lower():
        return "nvidia-jetson"
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists():
        return "nvidia"
    return None


def detect() -> Capabilities:
    flags, model = parse_cpuinfo(_read("/proc/cpuinfo"))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        providers = tuple(available_onnx_providers())
    except ImportError:
        providers = ()
    return Capabilities(
        arch=machine(), cores=cores, ram_mb=parse_meminfo_mb(_read("/proc/meminfo")),
        cpu_model=model, cpu_features=tuple(f for f in REPORTED_FEATURES if f in flags),
        gpu=detect_gpu(), onnx_providers=providers, runtimes=available_runtimes(),
        litert_backend=litert_backend(), numpy_version=np.__version__)
