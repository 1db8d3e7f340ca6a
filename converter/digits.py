"""The demo model: scikit-learn's bundled 8x8 digits and a small CNN that learns them.

Everything here is deterministic for a given seed: the stratified split, the weight
initialisation and the order of mini-batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

DIGIT_LABELS = tuple(str(i) for i in range(10))
INPUT_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class DigitsData:
    """Train and held-out splits; ``x`` is float32 N×1×8×8 in [0, 1], ``y`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 15
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 2e-3
    threads: int = 2
    test_fraction: float = 0.25


@dataclass(frozen=True)
class TrainedDigits:
    model: nn.Module
    data: DigitsData
    test_accuracy: float  # fraction 0..1, torch on the held-out split


class DigitsCNN(nn.Module):
    """conv(1→16)-relu-conv(16→32)-relu-maxpool2-flatten-fc(512→64)-relu-fc(64→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """Load the bundled digits, scale 0..16 to [0, 1], split stratified with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, *INPUT_SHAPE)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsData(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


def held_out_set(seed: int = 0, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images (float32 N×1×8×8) and labels (int64 N) the demo sends devices."""
    data = load_digits_data(seed, test_fraction)
    return data.x_test, data.y_test


def calibration_images(data: DigitsData, count: int = 200, seed: int = 0) -> np.ndarray:
    """A fixed random subset of training images for static quantization."""
    rng = np.random.default_rng(seed)
    count = min(count, len(data.x_train))
    idx = rng.choice(len(data.x_train), size=count, replace=False)
    return data.x_train[np.sort(idx)]


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def _train_loop(model: nn.Module, data: DigitsData, settings: TrainSettings) -> None:
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        logger.debug("epoch %d loss %.4f", epoch + 1, total / len(x))


def train_digits(epochs: int = 15, seed: int = 0,
                 settings: TrainSettings | None = None) -> TrainedDigits:
    """Train :class:`DigitsCNN` on the digits training split; a few seconds on 2 cores."""
    settings = settings or TrainSettings(epochs=epochs, seed=seed)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    data = load_digits_data(settings.seed, settings.test_fraction)
    model = DigitsCNN()
    _train_loop(model, data, settings)
    model.eval()
    acc = torch_accuracy(model, data.x_test, data.y_test)
    logger.info("digits CNN: %d epochs, held-out accuracy %.4f", settings.epochs, acc)
    return TrainedDigits(model=model, data=data, test_accuracy=acc)
