"""Small models importable as ``tests.converter.models_for_tests:<factory>`` by the CLI."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def digit_batches():
    """A data callable: yields (x, y) batches of the digits test split."""
    from edgeship.converter.digits import load_digits_data

    data = load_digits_data()
    for i in range(0, 200, 50):
        yield data.x_test[i:i + 50], data.y_test[i:i + 50]


def random_batches():
    rng = np.random.default_rng(0)
    for _ in range(3):
        yield rng.random((16, 1, 8, 8), dtype=np.float32)


class WithSampleRate(nn.Module):
    """forward(x, sr): a non-tensor argument, like a voice model's sample rate."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN()

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.body(x * (sr / 16000))


def with_sample_rate() -> nn.Module:
    torch.manual_seed(0)
    return WithSampleRate()


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.cls = nn.Linear(8 * 64, 10)
        self.box = nn.Linear(8 * 64, 4)

    def forward(self, x: torch.Tensor):
        f = self.body(x)
        return self.cls(f), self.box(f)


def two_heads() -> nn.Module:
    torch.manual_seed(0)
    return TwoHeads()
