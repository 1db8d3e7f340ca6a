"""Bundle layout: the manifest that travels with every model version.

A bundle is a directory (or a tar of it) holding ``manifest.json``, one file per variant
and ``golden.npz`` (inputs plus each variant's outputs for the device's health check).
This module parses and validates manifests; it does no I/O beyond what callers hand it.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeship.agent.errors import BundleError, ProtocolError
from edgeship.agent.llm.spec import LlmSpec
from edgeship.agent.protocol import INT64_MAX, SCHEMA_VERSION, loads, validate_id

MANIFEST_NAME = "manifest.json"
GOLDEN_NAME = "golden.npz"
MAX_MANIFEST_BYTES = 1024 * 1024

RUNTIMES = ("onnxruntime", "litert", "onnxruntime-genai")
#: where each runtime has a build: onnxruntime (and onnxruntime-genai) have no armv7l
#: (32-bit Arm) wheel at all; TFLite runs there through tflite-runtime
RUNTIME_HARDWARE = {"onnxruntime": ("x86_64", "aarch64"),
                    "onnxruntime-genai": ("x86_64", "aarch64"),
                    "litert": ("x86_64", "aarch64", "armv7l")}
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "int8-static", "int4")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
          "uint32", "int64", "uint64", "bool")
TASKS = ("classification", "detection", "segmentation", "embedding", "sequence",
         "regression", "generic")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None = dynamic dimension (batch)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Variant:
    id: str
    runtime: str
    precision: str
    file: str
    sha256: str
    size: int
    metrics: dict[str, float] = field(default_factory=dict)
    golden_atol: float = 1e-4
    hardware: tuple[str, ...] = ("x86_64", "aarch64", "armv7l")
    #: per-output health-check tolerance (output name -> atol); absent: ``golden_atol``
    golden_tolerances: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hardware"] = list(self.hardware)
        if not self.golden_tolerances:
            del d["golden_tolerances"]
        return d

    def tolerance(self, output: str) -> float:
        return self.golden_tolerances.get(output, self.golden_atol)


@dataclass(frozen=True)
class ShadowPolicy:
    """Optional per release (issue 4): before the switch, the candidate runs beside the
    current model on a sample of live requests; it is committed only if the top-1
    agreement over ``samples`` compared samples reaches ``min_agreement``."""

    min_agreement: float
    samples: int = 100
    sample_rate: float = 1.0  # fraction of live requests mirrored to the candidate
    timeout_s: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    model: str
    version: int
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    golden_file: str
    golden_sha256: str
    golden_size: int
    reference: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    labels: tuple[str, ...] = ()
    shadow: ShadowPolicy | None = None
    #: the release's own latency budget (``--latency-budget-ms``); None: derived on the
    #: device from the converter's measurements, else the board profile's default
    latency_budget_ms: float | None = None
    #: where the converter measured the variants' latency (arch, cpu, flags)
    measured_on: dict[str, str] = field(default_factory=dict)
    llm: LlmSpec | None = None  # language models: context, KV-cache shape, tokens
    #: the reference profile for drift and the label-free estimate (JSON as written by
    #: converter/profile.py; parsed by agent.quality.profile when the version is served)
    profile: dict[str, Any] | None = None

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise BundleError(f"manifest of {self.model} v{self.version} has no variant "
                          f"{variant_id!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "created_at": self.created_at,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "variants": [v.to_dict() for v in self.variants],
            "golden": {"file": self.golden_file, "sha256": self.golden_sha256,
                       "size": self.golden_size},
            "reference": dict(self.reference),
            "labels": list(self.labels),
            **({"shadow": self.shadow.to_dict()} if self.shadow else {}),
            **({"latency_budget_ms": self.latency_budget_ms}
               if self.latency_budget_ms is not None else {}),
            **({"measured_on": dict(self.measured_on)} if self.measured_on else {}),
            **({"llm": self.llm.to_dict()} if self.llm else {}),
            **({"profile": self.profile} if self.profile is not None else {}),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            raw = loads(data)
        except ProtocolError as e:
            raise BundleError(f"manifest: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "Manifest":
        try:
            return _parse_manifest(raw)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"manifest field invalid: {e!r}") from e


#: Names the agent itself uses inside a model version's directory, and the suffixes of its
#: temp/resume/delta files: a bundle file must never be mistaken for one of them.
RESERVED_FILE_NAMES = frozenset({"installed.json", "current", "desired.json"})
RESERVED_SUFFIXES = (".tmp", ".resume", ".delta", ".partial")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_HARDWARE_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
#: Control characters, line separators and invisible formatting characters such as the
#: bidi override U+202E (``evil\u202excod.onnx`` displays as ``evildocx.onnx``).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
MAX_TENSORS = 256
MAX_RANK = 32
MAX_LABELS = 100_000


def _safe_file_name(name: Any) -> str:
    if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
        raise BundleError(f"bad file name in manifest: {name!r} (use 1-128 of "
                          "[A-Za-z0-9_.+-], not starting with '.', '_', '+' or '-')")
    if name in RESERVED_FILE_NAMES or name.endswith(RESERVED_SUFFIXES):
        raise BundleError(f"file name {name!r} in manifest is reserved for the agent")
    return name


def _text(value: Any, what: str, limit: int = 256) -> str:
    """A display string: bounded, no control or invisible formatting characters."""
    if not isinstance(value, str) or len(value) > limit or any(
            unicodedata.category(c) in _UNSAFE_CATEGORIES for c in value):
        raise BundleError(f"bad {what} in manifest: {str(value)[:80]!r} (text of at most "
                          f"{limit} characters, no control or bidi characters)")
    return value


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(
            c not in "0123456789abcdef" for c in value):
        raise BundleError(f"bad sha256 in manifest: {value!r}")
    return value


def _int(value: Any, what: str, low: int, high: int = INT64_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BundleError(f"bad {what} in manifest: {str(value)[:40]!r} (an integer in "
                          f"[{low}, {high}])")
    return value


def _size(value: Any) -> int:
    return _int(value, "size", 1)


def _number(value: Any, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite JSON number in [low, high] — never a string such as "NaN"."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not low <= value <= high):
        raise BundleError(f"bad {what} in manifest: {str(value)[:40]!r} (a finite number "
                          f"in [{low}, {high}])")
    return float(value)


def _numbers(raw: Any, what: str) -> dict[str, float]:
    if not isinstance(raw, dict) or len(raw) > MAX_TENSORS:
        raise BundleError(f"bad {what} in manifest: expected an object of numbers")
    return {_text(k, f"{what} name", 64): _number(v, f"{what} {k!r}") for k, v in raw.items()}


def _dim(d: Any) -> int | None:
    if d is None or d == -1 and not isinstance(d, bool):
        return None
    return _int(d, "shape dimension", 0)


def _tensor(raw: dict[str, Any]) -> TensorSpec:
    if raw["dtype"] not in DTYPES:
        raise BundleError(f"unsupported dtype {str(raw['dtype'])[:40]!r}")
    shape = raw["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise BundleError(f"bad shape in manifest: {str(shape)[:80]!r} (a list of at most "
                          f"{MAX_RANK} dimensions: integers >= 0, or null for dynamic)")
    return TensorSpec(name=_text(raw["name"], "tensor name", 512), dtype=raw["dtype"],
                      shape=tuple(_dim(d) for d in shape))


def _tensors(raw: Any, what: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TENSORS:
        raise BundleError(f"manifest {what} must list 1-{MAX_TENSORS} tensors")
    specs = tuple(_tensor(t) for t in raw)
    if len({t.name for t in specs}) != len(specs):
        raise BundleError(f"manifest {what} repeat a tensor name")
    return specs


def _hardware(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= 16 or not all(
            isinstance(h, str) and _HARDWARE_RE.match(h) for h in raw):
        raise BundleError(f"bad hardware list in manifest: {str(raw)[:80]!r}")
    return tuple(raw)


def _variant(raw: dict[str, Any]) -> Variant:
    if raw["runtime"] not in RUNTIMES:
        raise BundleError(f"unknown runtime {str(raw['runtime'])[:40]!r}")
    if raw["precision"] not in PRECISIONS:
        raise BundleError(f"unknown precision {str(raw['precision'])[:40]!r}")
    tolerances = _numbers(raw.get("golden_tolerances", {}), "golden tolerance")
    for name, tol in tolerances.items():
        _number(tol, f"golden tolerance {name!r}", 0.0)
    return Variant(id=validate_id(raw["id"], "variant id"), runtime=raw["runtime"],
                   precision=raw["precision"], file=_safe_file_name(raw["file"]),
                   sha256=_sha256(raw["sha256"]), size=_size(raw["size"]),
                   metrics=_numbers(raw.get("metrics", {}), "metric"),
                   golden_atol=_number(raw.get("golden_atol", 1e-4), "golden_atol", 0.0),
                   hardware=_hardware(raw.get("hardware", list(Variant.hardware))),
                   golden_tolerances=tolerances)


def _budget(value: Any) -> float | None:
    if value is None:
        return None
    v = _number(value, "latency_budget_ms", 0.0, 3_600_000.0)
    if v == 0:
        raise BundleError("bad latency_budget_ms in manifest: 0 (a positive number of ms)")
    return v


def _measured_on(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or len(raw) > MAX_TENSORS:
        raise BundleError("bad measured_on in manifest: expected an object of texts")
    return {_text(k, "measured_on key", 64): _text(v, f"measured_on {k!r}", 128)
            for k, v in raw.items()}


def _parse_manifest(raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise BundleError("manifest is not a JSON object")
    if raw.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"unsupported manifest schema {raw.get('schema')!r}")
    version = _int(raw["version"], "model version", 1)
    if not isinstance(raw["variants"], list) or not 1 <= len(raw["variants"]) <= 64:
        raise BundleError("manifest must list 1-64 variants")
    variants = tuple(_variant(v) for v in raw["variants"])
    ids = [v.id for v in variants]
    files = [v.file for v in variants]
    if len(set(ids)) != len(ids) or len(set(files)) != len(files):
        raise BundleError("manifest repeats a variant id or file")
    golden = raw["golden"]
    return Manifest(
        model=validate_id(raw["model"], "model name"), version=version,
        task=_text(raw.get("task", "classification"), "task", 64),
        inputs=_tensors(raw["inputs"], "inputs"), outputs=_tensors(raw["outputs"], "outputs"),
        variants=variants, golden_file=_safe_file_name(golden["file"]),
        golden_sha256=_sha256(golden["sha256"]), golden_size=_size(golden["size"]),
        reference=_numbers(raw.get("reference", {}), "reference metric"),
        created_at=_text(raw.get("created_at", ""), "created_at", 64),
        labels=_labels(raw.get("labels", [])),
        shadow=_shadow(raw.get("shadow")),
        latency_budget_ms=_budget(raw.get("latency_budget_ms")),
        measured_on=_measured_on(raw.get("measured_on", {})),
        llm=LlmSpec.from_dict(raw["llm"]) if raw.get("llm") is not None else None,
        profile=_profile(raw.get("profile")),
    )


def _profile(raw: Any) -> dict[str, Any] | None:
    """Kept as JSON; checked when the version is served (a bad profile turns drift
    monitoring off for that version and says why, it never blocks the install)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BundleError("manifest field 'profile' must be an object")
    return raw


def _labels(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_LABELS:
        raise BundleError(f"manifest labels must be a list of at most {MAX_LABELS}")
    return tuple(_text(x, "label") for x in raw)


def _shadow(raw: Any) -> ShadowPolicy | None:
    if raw is None:
        return None
    policy = ShadowPolicy(min_agreement=_number(raw["min_agreement"], "min_agreement"),
                          samples=_int(raw.get("samples", 100), "shadow samples", 1,
                                       1_000_000),
                          sample_rate=_number(raw.get("sample_rate", 1.0), "sample_rate"),
                          timeout_s=_number(raw.get("timeout_s", 600.0), "shadow timeout_s"))
    if not (0 < policy.min_agreement <= 1 and 0 < policy.sample_rate <= 1
            and policy.timeout_s > 0):
        raise BundleError(f"bad shadow policy in manifest: {str(raw)[:200]}")
    return policy
