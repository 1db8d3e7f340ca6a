"""From parsed ``edgeship convert`` arguments to a :class:`ConvertResult` (the glue between
:mod:`converter.sources` and :mod:`converter.pipeline`)."""

from __future__ import annotations

import argparse
import inspect
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeship.converter.errors import InputError
from edgeship.converter.options import parse_const_args, parse_floats, parse_input_shapes, parse_shape
from edgeship.converter.samples import RawData, first_line
from edgeship.converter.sources import Preprocess, check_shape, load_data, load_torch_model

logger = logging.getLogger(__name__)


def preprocess_from_args(args: argparse.Namespace) -> Preprocess:
    size = parse_shape(args.resize)
    if size is not None and len(size) != 2:
        raise InputError(f"--resize wants H,W, got {args.resize!r}", key="resize")
    kw = {"size": size, "layout": args.layout or "NCHW",
          "grayscale": bool(args.grayscale)}
    for key in ("mean", "std"):
        values = parse_floats(getattr(args, key), f"--{key}")
        if values is not None:
            kw[key] = values
    return Preprocess(**kw)


def load_datasets(args: argparse.Namespace) -> tuple[RawData | None, RawData | None]:
    """Calibration and validation data as stored; validation defaults to the calibration
    data, and neither is required (no data: the variants that need none)."""
    pre = preprocess_from_args(args)
    calib = load_data(args.calib, pre) if args.calib else None
    val = load_data(args.val, pre) if args.val else None
    if calib is not None and val is None:
        logger.warning("no --val: measuring variants on the calibration data")
        val = calib
    return calib, val or None


def convert_from_args(args: argparse.Namespace, name: str, bundle_dir: Path, plan,
                      settings, progress: bool):
    from edgeship.converter.pipeline import convert_digits, convert_onnx, convert_tflite

    shrinking = any(getattr(args, k, None) is not None
                    for k in ("prune_sparsity", "prune_channels", "student"))
    if args.source == "digits" and not shrinking:
        return convert_digits(bundle_dir, args.version, epochs=args.epochs, seed=args.seed,
                              threads=plan.threads, gate=plan.gate, name=name,
                              progress=progress, settings=settings)
    if args.source == "digits":
        model, calib, val = _digits(args)
        return _convert_shrunk(model, calib, val, args, name, bundle_dir, plan, settings,
                               progress, example=val.rows()[:1])
    calib, val = load_datasets(args)
    if args.source == "onnx":
        return convert_onnx(args.model, calib, val, bundle_dir, name, args.version,
                            plan.gate, plan.threads, settings=settings, progress=progress,
                            pins=parse_input_shapes(args.input_shape))
    if args.source == "tflite":
        return convert_tflite(args.model, calib, val, bundle_dir, name, args.version,
                              plan.gate, plan.threads, settings=settings, progress=progress)
    model = _torch_model(args)
    calib, val = _torch_data(args, calib, val)
    example = _example_input(model, args, val.rows())
    return _convert_shrunk(model, calib, val, args, name, bundle_dir, plan, settings,
                           progress, example=example)


def _torch_data(args: argparse.Namespace, calib: RawData | None,
                val: RawData | None) -> tuple[RawData, RawData]:
    """Torch sources need example data: the given files, else random rows of
    ``--input-shape`` (accuracy is then not measured)."""
    if calib is not None:
        return calib, val or calib
    shape = parse_shape(args.input_shape)
    if shape is None:
        raise InputError("a PyTorch source needs --calib data or --input-shape N,C,H,W",
                         key="calib")
    rows = np.random.default_rng(0).random((8, *shape[1:]), dtype=np.float32)
    data = RawData({"x": rows}, None, "synthesized inputs")
    return data, data


def _digits(args: argparse.Namespace):
    from edgeship.converter.digits import calibration_images, train_digits

    trained = train_digits(epochs=args.epochs, seed=args.seed)
    d = trained.data
    return (trained.model, RawData({"x": calibration_images(d, count=len(d.x_train))}),
            RawData({"x": d.x_test}, d.y_test))


def _shrink(model, calib: RawData, args: argparse.Namespace, example):
    """Apply --prune-sparsity / --prune-channels / --student in that order."""
    from edgeship.converter.shrink import TrainSpec, distill, prune_channels, prune_unstructured
    from edgeship.converter.sources import import_object

    spec = TrainSpec(epochs=3 if args.finetune_epochs is None else args.finetune_epochs,
                     temperature=args.temperature or 4.0,
                     alpha=0.7 if args.alpha is None else args.alpha)
    notes = {}
    x = np.asarray(calib.rows(), np.float32)
    if args.prune_sparsity is not None:
        model = prune_unstructured(model, float(args.prune_sparsity))
        notes["pruned_sparsity"] = float(args.prune_sparsity)
    if args.prune_channels is not None:
        model = prune_channels(model, example, float(args.prune_channels), x, calib.y, spec)
        notes["pruned_channels"] = float(args.prune_channels)
    if args.student is not None:
        model = distill(model, import_object(args.student)(), x, calib.y, spec)
        notes["student"] = args.student
    return model, notes


def _convert_shrunk(original, calib: RawData, val: RawData, args, name, bundle_dir, plan,
                    settings, progress, example):
    from edgeship.converter.pipeline import convert

    shrunk, notes = _shrink(original, calib, args, example)
    if notes:
        logger.info("converting the shrunk model %s against the original", notes)
    return convert(shrunk, example, np.asarray(calib.rows(), np.float32),
                   np.asarray(val.rows(), np.float32), val.y, bundle_dir, name,
                   args.version, plan.gate, plan.threads, settings=replace(settings),
                   progress=progress, reference_model=original,
                   const_kwargs=parse_const_args(getattr(args, "const_arg", None)))


def _torch_model(args: argparse.Namespace):
    spec = str(args.model)
    if ":" in spec and not Path(spec).exists():
        return load_torch_model(factory=spec, weights=args.weights)
    if args.weights:
        raise InputError("--weights goes with a package.module:factory model, not a file")
    if spec.endswith(".pt2"):
        return load_torch_model(exported=spec)
    return load_torch_model(torchscript=spec)


def _example_input(model, args: argparse.Namespace, data: np.ndarray) -> np.ndarray:
    """One sample of the data, checked against ``--input-shape`` and run once in torch."""
    import torch

    shape = parse_shape(args.input_shape)
    if shape is not None:
        check_shape(shape, data.shape, "--input-shape")
    example = np.ascontiguousarray(data[:1], dtype=np.float32)
    consts = parse_const_args(getattr(args, "const_arg", None)) or {}
    missing = _missing_arguments(model, consts)
    if missing:
        raise InputError(f"{args.model}: forward() also takes {', '.join(missing)}, which "
                         "are not tensors of the data: give each a constant with --const-arg "
                         f"{missing[0]}=VALUE (or const_args in the recipe's [model] table)",
                         key="const_arg")
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(example), **consts)
    except Exception as e:  # noqa: BLE001 - a shape mismatch surfaces as anything
        raise InputError(f"{args.model}: model fails on data of shape "
                         f"{list(example.shape)}: {type(e).__name__}: "
                         f"{first_line(e, 200)}") from e
    tensors = out if isinstance(out, (tuple, list)) else [out]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise InputError(f"{args.model}: model must return a tensor or a tuple of tensors")
    return example


def _missing_arguments(model, consts: dict) -> list[str]:
    """Required parameters of ``forward`` after the first that no constant covers."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # TorchScript / builtins: nothing to inspect
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in positional[1:]
            if p.default is inspect.Parameter.empty and p.name not in consts]
