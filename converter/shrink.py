"""Make the PyTorch model itself smaller before export: pruning and distillation.

- :func:`prune_unstructured`: global L1 magnitude pruning of Conv/Linear weights to a target
  sparsity (``torch.nn.utils.prune``); the zeros are baked in, so the file is the same size
  but compresses well (see ``zstd_size_bytes``).
- :func:`prune_channels`: structured pruning with Torch-Pruning's dependency graph, which
  really removes channels (and the matching inputs of the next layers), so the model gets
  smaller and faster; optional short fine-tune.
- :func:`distill`: train a given smaller student from the teacher (soft targets at a
  temperature, mixed with hard labels by ``alpha``).

Every function returns a new model; the input model is not modified.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np

from edgeship.converter.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) loss; 1 - alpha on the hard labels
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.temperature <= 0:
            raise InputError("epochs >= 0, batch_size >= 1 and temperature > 0 required")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha must be within [0, 1], got {self.alpha}")


def _prunable(model):
    from torch import nn

    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sparsity(model) -> float:
    """Fraction of exactly-zero weights over all Conv/Linear weights."""
    total = zeros = 0
    for module, name in _prunable(model):
        w = getattr(module, name).detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


def prune_unstructured(model, target_sparsity: float):
    """A copy of ``model`` with the smallest-magnitude weights (globally) set to zero."""
    import torch.nn.utils.prune as prune

    if not 0.0 < target_sparsity < 1.0:
        raise InputError(f"sparsity must be within (0, 1), got {target_sparsity}")
    pruned = copy.deepcopy(model).eval()
    params = _prunable(pruned)
    if not params:
        raise InputError("the model has no Conv2d/Linear weights to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured,
                              amount=target_sparsity)
    for module, name in params:
        prune.remove(module, name)
    logger.info("unstructured pruning: sparsity %.3f", sparsity(pruned))
    return pruned


def prune_channels(model, example_input: np.ndarray, ratio: float, x=None, y=None,
                   finetune: TrainSpec | None = None):
    """A copy with ``ratio`` of the channels of every Conv/Linear removed (the classifier's
    output layer kept), fine-tuned on ``x``/``y`` if given (distilling from the unpruned
    model where ``y`` is None)."""
    import torch
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise InputError(f"channel pruning ratio must be within (0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    example = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    last = [m for m, _ in _prunable(pruned)][-1:]  # keep the number of outputs
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=last)
    pruner.step()
    logger.info("channel pruning: %d → %d parameters", count_parameters(model),
                count_parameters(pruned))
    if finetune is not None and finetune.epochs > 0 and x is not None:
        pruned = distill(model, pruned, x, y, finetune)
    return pruned.eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def distill(teacher, student, x: np.ndarray, y: np.ndarray | None, spec: TrainSpec):
    """Train a copy of ``student`` to match ``teacher`` (KL at ``temperature``) and, with
    labels, the labels (cross-entropy), weighted ``alpha`` : ``1 - alpha``."""
    import torch
    import torch.nn.functional as F

    student = copy.deepcopy(student)
    teacher = teacher.eval()
    gen = torch.Generator().manual_seed(spec.seed)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = None if y is None else torch.as_tensor(np.asarray(y, dtype=np.int64))
    alpha = 1.0 if yt is None else spec.alpha
    opt = torch.optim.Adam(student.parameters(), lr=spec.learning_rate)
    t = spec.temperature
    for _ in range(spec.epochs):
        student.train()
        for idx in torch.randperm(len(xt), generator=gen).split(spec.batch_size):
            with torch.no_grad():
                soft = F.softmax(teacher(xt[idx]) / t, dim=1)
            logits = student(xt[idx])
            loss = alpha * F.kl_div(F.log_softmax(logits / t, dim=1), soft,
                                    reduction="batchmean") * t * t
            if yt is not None and alpha < 1.0:
                loss = loss + (1.0 - alpha) * F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval()


def top1(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = model.eval()(torch.as_tensor(np.asarray(x, dtype=np.float32))).argmax(1)
    return float((pred.numpy() == y).mean())
