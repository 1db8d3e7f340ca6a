"""Turn CLI flags, a TOML recipe and a device profile into typed converter settings.

Precedence: command-line flag > recipe > device profile > built-in default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeship.agent.errors import did_you_mean
from edgeship.common.compat import tomllib
from edgeship.converter.errors import InputError
from edgeship.converter.gates import Gate
from edgeship.converter.quantize import CALIBRATION_METHODS
from edgeship.converter.variants import (ALL_VARIANTS, ONNX_VARIANTS, runtime_of,
                                validate_variant_ids, variants_for_precisions)

DEFAULT_THREADS = 2
# Recipe keys (flat or in tables [model], [data], [preprocess], [gates], [quantize]) → args.
RECIPE_KEYS = {
    "model": "model", "weights": "weights", "input_shape": "input_shape", "name": "name",
    "calib": "calib", "val": "val", "device": "device", "variants": "variants",
    "threads": "threads", "resize": "resize", "layout": "layout", "mean": "mean",
    "std": "std", "grayscale": "grayscale", "calibration": "calibration",
    "max_accuracy_drop_points": "max_drop", "min_agreement": "min_agreement",
    "min_cosine": "min_cosine", "max_size_kb": "max_size_kb", "fallback": "fallback",
    "version": "version", "prune_sparsity": "prune_sparsity",
    "prune_channels": "prune_channels", "student": "student",
    "finetune_epochs": "finetune_epochs", "temperature": "temperature", "alpha": "alpha",
}


@dataclass(frozen=True)
class Plan:
    """What to build, how many threads to time with, and the gate to hold variants to."""

    variants: tuple[str, ...]
    threads: int
    gate: Gate
    device: str | None = None
    skipped: tuple[str, ...] = ()  # variants dropped because the input cannot make them


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A TOML recipe flattened to argparse destination names."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: recipe file does not exist")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid TOML: {e}") from e
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if k not in RECIPE_KEYS:
                raise InputError(f"{p}: unknown recipe key {k!r}"
                                 f"{did_you_mean(k, RECIPE_KEYS)}; known: "
                                 f"{', '.join(sorted(RECIPE_KEYS))}", key=k)
            flat[RECIPE_KEYS[k]] = v
    return flat


def parse_shape(text: str | list | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = text if isinstance(text, list) else str(text).replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError as e:
        raise InputError(f"input shape {text!r} is not a list of integers") from e
    if not shape or any(d < 1 for d in shape):
        raise InputError(f"input shape {text!r} must be positive integers")
    return shape


def parse_floats(text: str | list | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    parts = text if isinstance(text, list) else str(text).split(",")
    try:
        return tuple(float(p) for p in parts)
    except ValueError as e:
        raise InputError(f"{what} {text!r} is not a list of numbers") from e


def parse_variants(text: str | list | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    parts = text if isinstance(text, list) else str(text).split(",")
    names = tuple(p.strip() for p in parts if p.strip())
    if names == ("all",):
        return ALL_VARIANTS
    try:
        return validate_variant_ids(names)
    except Exception as e:  # ConfigError → the same one-line message as input error
        raise InputError(str(e), key="variants") from e


def plan(*, device: str | None, variants: tuple[str, ...] | None, threads: int | None,
         gate_overrides: dict[str, Any], has_torch_source: bool) -> Plan:
    """Variants, threads and gate from the profile, overridden by explicit choices."""
    profile = _profile(device)
    if variants is None:
        variants = (variants_for_precisions(profile.preferred_precisions, profile.runtimes)
                    if profile else ONNX_VARIANTS)
        if not has_torch_source:
            skipped = tuple(v for v in variants if runtime_of(v) == "litert")
            variants = tuple(v for v in variants if runtime_of(v) != "litert")
        else:
            skipped = ()
    else:
        skipped = ()
        tflite = [v for v in variants if runtime_of(v) == "litert"]
        if tflite and not has_torch_source:
            raise InputError(f"{', '.join(tflite)} need the PyTorch source: TFLite is "
                             "converted from PyTorch with litert-torch, not from ONNX")
    base = _profile_gate(profile) if profile else Gate()
    gate = replace(base, **{k: v for k, v in gate_overrides.items() if v is not None})
    return Plan(tuple(variants), threads or (profile.threads if profile else
                                             DEFAULT_THREADS),
                gate, profile.name if profile else None, skipped)


def _profile(device: str | None):
    if device is None:
        return None
    from edgeship.devices import load_profile

    try:
        return load_profile(device)
    except Exception as e:  # ConfigError from the profile loader
        raise InputError(str(e), key="device") from e


def _profile_gate(profile) -> Gate:
    g = profile.gates
    return Gate(max_accuracy_drop_points=g.max_accuracy_drop_points,
                min_agreement=g.min_agreement, min_cosine=g.min_cosine,
                max_size_bytes=(int(g.max_model_mb * 1024 * 1024)
                                if g.max_model_mb is not None else None),
                max_latency_p99_ms=g.max_latency_p99_ms)


def check_calibration(method: str | None) -> str | None:
    if method is not None and method not in CALIBRATION_METHODS:
        raise InputError(f"--calibration must be one of {', '.join(CALIBRATION_METHODS)}, "
                         f"got {method!r}", key="calibration")
    return method
