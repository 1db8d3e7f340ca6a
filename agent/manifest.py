"""Bundle layout: the manifest that travels with every model version.

A bundle is a directory (or a tar of it) holding ``manifest.json``, one file per variant
and ``golden.npz`` (inputs plus each variant's outputs for the device's health check).
This module parses and validates manifests; it does no I/O beyond what callers hand it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeship.agent.errors import BundleError
from edgeship.agent.llm.spec import LlmSpec
from edgeship.agent.protocol import SCHEMA_VERSION, validate_id

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hardware"] = list(self.hardware)
        return d


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
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"manifest is not JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "Manifest":
        try:
            return _parse_manifest(raw)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"manifest field invalid: {e!r}") from e


def _safe_file_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name
            or name in (".", "..") or name.startswith(".") or len(name) > 128):
        raise BundleError(f"bad file name in manifest: {name!r}")
    return name


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(
            c not in "0123456789abcdef" for c in value):
        raise BundleError(f"bad sha256 in manifest: {value!r}")
    return value


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BundleError(f"bad size in manifest: {value!r}")
    return value


def _tensor(raw: dict[str, Any]) -> TensorSpec:
    if raw["dtype"] not in DTYPES:
        raise BundleError(f"unsupported dtype {raw['dtype']!r}")
    shape = tuple(None if d is None or d == -1 else int(d) for d in raw["shape"])
    return TensorSpec(name=str(raw["name"]), dtype=raw["dtype"], shape=shape)


def _variant(raw: dict[str, Any]) -> Variant:
    if raw["runtime"] not in RUNTIMES:
        raise BundleError(f"unknown runtime {raw['runtime']!r}")
    if raw["precision"] not in PRECISIONS:
        raise BundleError(f"unknown precision {raw['precision']!r}")
    metrics = {str(k): float(v) for k, v in dict(raw.get("metrics", {})).items()}
    return Variant(id=validate_id(raw["id"], "variant id"), runtime=raw["runtime"],
                   precision=raw["precision"], file=_safe_file_name(raw["file"]),
                   sha256=_sha256(raw["sha256"]), size=_size(raw["size"]), metrics=metrics,
                   golden_atol=float(raw.get("golden_atol", 1e-4)),
                   hardware=tuple(str(h) for h in raw.get("hardware", Variant.hardware)))


def _parse_manifest(raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise BundleError("manifest is not a JSON object")
    if raw.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"unsupported manifest schema {raw.get('schema')!r}")
    version = raw["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"bad model version {version!r}")
    variants = tuple(_variant(v) for v in raw["variants"])
    if not variants:
        raise BundleError("manifest lists no variants")
    ids = [v.id for v in variants]
    files = [v.file for v in variants]
    if len(set(ids)) != len(ids) or len(set(files)) != len(files):
        raise BundleError("manifest repeats a variant id or file")
    golden = raw["golden"]
    return Manifest(
        model=validate_id(raw["model"], "model name"), version=version,
        task=str(raw.get("task", "classification")),
        inputs=tuple(_tensor(t) for t in raw["inputs"]),
        outputs=tuple(_tensor(t) for t in raw["outputs"]),
        variants=variants, golden_file=_safe_file_name(golden["file"]),
        golden_sha256=_sha256(golden["sha256"]), golden_size=_size(golden["size"]),
        reference={str(k): float(v) for k, v in dict(raw.get("reference", {})).items()},
        created_at=str(raw.get("created_at", "")),
        labels=tuple(str(x) for x in raw.get("labels", [])),
        shadow=_shadow(raw.get("shadow")),
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


def _shadow(raw: Any) -> ShadowPolicy | None:
    if raw is None:
        return None
    policy = ShadowPolicy(min_agreement=float(raw["min_agreement"]),
                          samples=int(raw.get("samples", 100)),
                          sample_rate=float(raw.get("sample_rate", 1.0)),
                          timeout_s=float(raw.get("timeout_s", 600.0)))
    if not (0 < policy.min_agreement <= 1 and 1 <= policy.samples <= 1_000_000
            and 0 < policy.sample_rate <= 1 and policy.timeout_s > 0):
        raise BundleError(f"bad shadow policy in manifest: {raw!r}")
    return policy
