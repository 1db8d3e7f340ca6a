"""From parsed ``edgeship convert`` arguments to a :class:`ConvertResult` (the glue between
:mod:`converter.sources` and :mod:`converter.pipeline`)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeship.converter.errors import InputError
from edgeship.converter.options import parse_floats, parse_shape
from edgeship.converter.sources import Dataset, Preprocess, check_shape, load_data, load_torch_model

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


def load_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """Calibration and validation data; validation defaults to the calibration data."""
    if not args.calib:
        raise InputError("missing calibration data: give --calib (.npy, .npz, image folder "
                         "or package.module:callable)", key="calib")
    pre = preprocess_from_args(args)
    calib = load_data(args.calib, pre)
    if not args.val:
        logger.warning("no --val: measuring variants on the calibration data")
        return calib, calib
    val = load_data(args.val, pre)
    if val.x.shape[1:] != calib.x.shape[1:]:
        raise InputError(f"--val samples have shape {list(val.x.shape[1:])} but --calib "
                         f"samples {list(calib.x.shape[1:])}")
    return calib, val


def convert_from_args(args: argparse.Namespace, name: str, bundle_dir: Path, plan,
                      settings, progress: bool):
    from edgeship.converter.pipeline import convert_digits, convert_onnx

    shrinking = any(getattr(args, k, None) is not None
                    for k in ("prune_sparsity", "prune_channels", "student"))
    if args.source == "digits" and not shrinking:
        return convert_digits(bundle_dir, args.version, epochs=args.epochs, seed=args.seed,
                              threads=plan.threads, gate=plan.gate, name=name,
                              progress=progress, settings=settings)
    if args.source == "digits":
        model, calib, val = _digits(args)
        return _convert_shrunk(model, model, calib, val, args, name, bundle_dir, plan,
                               settings, progress, data_example=val.x[:1])
    calib, val = load_datasets(args)
    if args.source == "onnx":
        return convert_onnx(args.model, calib.x, val.x, val.y, bundle_dir, name,
                            args.version, plan.gate, plan.threads, settings=settings,
                            progress=progress)
    model = _torch_model(args)
    example = _example_input(model, args, val.x)
    return _convert_shrunk(model, model, calib, val, args, name, bundle_dir, plan, settings,
                           progress, data_example=example)


def _digits(args: argparse.Namespace):
    from edgeship.converter.digits import calibration_images, train_digits

    trained = train_digits(epochs=args.epochs, seed=args.seed)
    d = trained.data
    return (trained.model, Dataset(calibration_images(d, count=len(d.x_train)), None),
            Dataset(d.x_test, d.y_test))


def _shrink(model, calib: Dataset, args: argparse.Namespace, example):
    """Apply --prune-sparsity / --prune-channels / --student in that order."""
    from edgeship.converter.shrink import TrainSpec, distill, prune_channels, prune_unstructured
    from edgeship.converter.sources import import_object

    spec = TrainSpec(epochs=3 if args.finetune_epochs is None else args.finetune_epochs,
                     temperature=args.temperature or 4.0,
                     alpha=0.7 if args.alpha is None else args.alpha)
    notes = {}
    if args.prune_sparsity is not None:
        model = prune_unstructured(model, float(args.prune_sparsity))
        notes["pruned_sparsity"] = float(args.prune_sparsity)
    if args.prune_channels is not None:
        model = prune_channels(model, example, float(args.prune_channels), calib.x, calib.y,
                               spec)
        notes["pruned_channels"] = float(args.prune_channels)
    if args.student is not None:
        model = distill(model, import_object(args.student)(), calib.x, calib.y, spec)
        notes["student"] = args.student
    return model, notes


def _convert_shrunk(original, model, calib: Dataset, val: Dataset, args, name, bundle_dir,
                    plan, settings, progress, data_example):
    from edgeship.converter.pipeline import convert

    shrunk, notes = _shrink(model, calib, args, data_example)
    if notes:
        logger.info("converting the shrunk model %s against the original", notes)
    return convert(shrunk, data_example, calib.x, val.x, val.y, bundle_dir, name,
                   args.version, plan.gate, plan.threads, settings=replace(settings),
                   progress=progress, reference_model=original)


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
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(example))
    except Exception as e:  # noqa: BLE001 - a shape mismatch surfaces as anything
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise InputError(f"{args.model}: model fails on data of shape "
                         f"{list(example.shape)}: {type(e).__name__}: {first}") from e
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise InputError(f"{args.model}: model must return one N×C tensor")
    return example
