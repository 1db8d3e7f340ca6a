"""Train the digits CNN once per session and convert it once; tests reuse both."""

from __future__ import annotations

import pytest

from edgeship.converter.digits import TrainedDigits, train_digits
from edgeship.converter.pipeline import ConvertResult, convert_digits

TEST_EPOCHS = 10


@pytest.fixture(scope="session")
def trained() -> TrainedDigits:
    return train_digits(epochs=TEST_EPOCHS, seed=0)


@pytest.fixture(scope="session")
def converted(trained, tmp_path_factory) -> ConvertResult:
    out = tmp_path_factory.mktemp("bundles") / "digits-v1"
    return convert_digits(out, version=1, trained=trained)
