"""The model's real inputs and outputs against what its manifest declares (pure).

The local API checks every request against the manifest's shapes and dtypes, so a manifest
that disagrees with the model (``[N, 1, 8, 9]`` declared for an 8x8 model) would pass the
health check on golden inputs and then refuse every correct request. The health check
therefore compares both first: same number of inputs and outputs, matched by name (by
position where a converter renamed the tensors, as TFLite exports do), same dtype, same
rank, and every dimension the manifest fixes equal to the model's where the model fixes it
too. A dimension the model leaves dynamic may be fixed by the manifest (it only narrows
what the API accepts); the batch dimension may be declared dynamic where the model fixes
it (the runtimes run such batches row by row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from edgeship.agent.errors import HealthCheckError, Reason
from edgeship.agent.manifest import Manifest, TensorSpec


@dataclass(frozen=True)
class IOSpec:
    """One tensor as the runtime sees it; ``None`` dimensions are dynamic."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | None, ...]


def _shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Mismatch:
    what: str  # "input" | "output"
    message: str
    shape_only: bool = False  # same tensor and dtype, other dimensions


def _pairs(declared: Sequence[TensorSpec], actual: Sequence[IOSpec], what: str,
           by_position: bool, problems: list[Mismatch]) -> list[tuple[TensorSpec, IOSpec]]:
    if len(declared) != len(actual):
        problems.append(Mismatch(what, f"manifest declares {len(declared)} {what}s, the "
                                 f"model has {len(actual)} "
                                 f"({', '.join(a.name for a in actual)})"))
        return []
    names = {a.name: a for a in actual}
    if all(d.name in names for d in declared):
        return [(d, names[d.name]) for d in declared]
    if by_position:
        return list(zip(declared, actual))
    missing = [d.name for d in declared if d.name not in names]
    problems.append(Mismatch(what, f"manifest {what}(s) {missing!r} are not in the model "
                             f"(it has {sorted(names)!r})"))
    return []


def _compare(d: TensorSpec, a: IOSpec, what: str) -> Mismatch | None:
    if d.dtype != a.dtype:
        return Mismatch(what, f"{what} {d.name!r}: manifest says {d.dtype}, the model "
                        f"has {a.dtype}")
    if len(d.shape) != len(a.shape):
        return Mismatch(what, f"{what} {d.name!r}: manifest shape {_shape(d.shape)} has "
                        f"rank {len(d.shape)}, the model's {_shape(a.shape)} has rank "
                        f"{len(a.shape)}", shape_only=True)
    for i, (dd, ad) in enumerate(zip(d.shape, a.shape)):
        if dd is not None and ad is not None and dd != ad or \
                dd is None and ad is not None and i > 0:
            return Mismatch(what, f"{what} {d.name!r}: manifest shape {_shape(d.shape)}, "
                            f"the model's is {_shape(a.shape)}", shape_only=True)
    return None


def find_mismatches(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                    actual_inputs: Sequence[IOSpec], actual_outputs: Sequence[IOSpec],
                    *, by_position: bool = False) -> list[Mismatch]:
    problems: list[Mismatch] = []
    for what, declared, actual in (("input", inputs, actual_inputs),
                                   ("output", outputs, actual_outputs)):
        for d, a in _pairs(declared, actual, what, by_position, problems):
            problem = _compare(d, a, what)
            if problem:
                problems.append(problem)
    return problems


def signature_mismatches(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                         actual_inputs: Sequence[IOSpec], actual_outputs: Sequence[IOSpec],
                         *, by_position: bool = False) -> list[str]:
    """Every difference between the declared and the real signature (empty: they agree)."""
    return [m.message for m in find_mismatches(inputs, outputs, actual_inputs,
                                               actual_outputs, by_position=by_position)]


def check_signature(runtime: object, manifest: Manifest) -> None:
    """Raise :class:`HealthCheckError` naming every difference: ``output_shape_mismatch``
    when only output dimensions differ, else ``model_signature_mismatch``. A runtime that
    cannot tell its signature is not checked."""
    signature = getattr(runtime, "signature", None)
    if signature is None:
        return
    actual_inputs, actual_outputs = signature()
    problems = find_mismatches(manifest.inputs, manifest.outputs, actual_inputs,
                               actual_outputs,
                               by_position=getattr(runtime, "signature_by_position", False))
    if problems:
        shape_only = all(p.what == "output" and p.shape_only for p in problems)
        raise HealthCheckError(
            "manifest does not match the model: " + "; ".join(p.message for p in problems),
            reason_code=Reason.OUTPUT_SHAPE_MISMATCH if shape_only
            else Reason.MODEL_SIGNATURE_MISMATCH)
