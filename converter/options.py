"""Turn CLI flags, a TOML recipe and a device profile into typed converter settings.

Precedence: command-line flag > recipe > device profile > built-in default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    "task": "task", "latency_budget_ms": "latency_budget_ms", "const_args": "const_arg",
}
TABLES = ("model", "data", "preprocess", "gates", "quantize")


@dataclass(frozen=True)
class Plan:
    """What to build, how many threads to time with, and the gate to hold variants to."""

    variants: tuple[str, ...]
    threads: int
    gate: Gate
    device: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it is not made


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
        tabled = isinstance(value, dict) and key in TABLES
        items = value.items() if tabled else [(key, value)]
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


def parse_input_shapes(text: str | list | dict | None) -> dict[str, tuple[int, ...]]:
    """``name=1,3,320,320`` (several separated by ``;`` or given as a list/table), or
    plain ``1,3,320,320`` for a model with one input (key ``""``)."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return {str(k): parse_shape(v) for k, v in text.items()}
    parts = text if isinstance(text, list) and text and isinstance(text[0], str) and \
        "=" in text[0] else [text] if isinstance(text, list) else str(text).split(";")
    out: dict[str, tuple[int, ...]] = {}
    for part in parts:
        if isinstance(part, str) and "=" in part:
            name, _, dims = part.rpartition("=")
            out[name.strip()] = parse_shape(dims.strip())
        elif part not in ("", None):
            out[""] = parse_shape(part)
    return out


def parse_const_args(items: list | dict | None) -> dict[str, Any]:
    """``--const-arg sr=16000`` (repeatable) or a recipe table → keyword arguments; values
    are read as JSON where they parse (numbers, true/false, lists), else kept as strings."""
    import json

    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip().isidentifier():
            raise InputError(f"--const-arg {item!r} is not NAME=VALUE", key="const_arg")
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value
    return out


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


NO_TFLITE_FROM_ONNX = "TFLite needs the PyTorch source (litert-torch), not ONNX"
NO_TFLITE_EXTRA = ("the tflite-convert extra is not installed (pip install "
                   "'edgeship[tflite-convert]')")
NO_ONNX_FROM_TFLITE = "ONNX variants cannot be made from a .tflite file"


def _unmakeable(source: str, tflite_available: bool) -> dict[str, str]:
    """Why each kind of variant cannot be made from this source (runtime -> reason)."""
    if source == "tflite":
        return {"onnxruntime": NO_ONNX_FROM_TFLITE}
    if source == "onnx":
        return {"litert": NO_TFLITE_FROM_ONNX}
    return {} if tflite_available else {"litert": NO_TFLITE_EXTRA}


def plan(*, device: str | None, variants: tuple[str, ...] | None, threads: int | None,
         gate_overrides: dict[str, Any], source: str = "torch",
         tflite_available: bool = True) -> Plan:
    """Variants, threads and gate from the profile, overridden by explicit choices.

    Variants the source cannot make are skipped with a reason when they came from the
    profile; asked for explicitly, they are an error."""
    profile = _profile(device)
    reasons = _unmakeable(source, tflite_available)
    skipped: dict[str, str] = {}
    if variants is None:
        variants = (variants_for_precisions(profile.preferred_precisions, profile.runtimes)
                    if profile else ONNX_VARIANTS)
        if source == "tflite":
            variants = _tflite_defaults(profile)
        skipped = {v: reasons[runtime_of(v)] for v in variants if runtime_of(v) in reasons}
        variants = tuple(v for v in variants if v not in skipped)
    else:
        bad = [v for v in variants if runtime_of(v) in reasons]
        if bad:
            raise InputError(f"{', '.join(bad)}: {reasons[runtime_of(bad[0])]}",
                             key="variants")
    base = _profile_gate(profile) if profile else Gate()
    gate = replace(base, **{k: v for k, v in gate_overrides.items() if v is not None})
    return Plan(tuple(variants), threads or (profile.threads if profile else
                                             DEFAULT_THREADS),
                gate, profile.name if profile else None, skipped)


def _tflite_defaults(profile) -> tuple[str, ...]:
    """A .tflite source: the TFLite variants of the profile's precisions (and fp32, which
    an fp32 file is), whatever runtimes the profile lists."""
    if profile is None:
        return ("tflite-fp32", "tflite-int8-dynamic", "tflite-int8")
    return variants_for_precisions(profile.preferred_precisions, ("litert",))


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
