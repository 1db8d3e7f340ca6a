from __future__ import annotations

import numpy as np

from edgeship.converter.digits import calibration_images, held_out_set, load_digits_data


def test_training_reaches_95_percent_on_held_out_digits(trained):
    assert trained.test_accuracy >= 0.95


def test_held_out_set_is_scaled_float_images_with_labels():
    x, y = held_out_set()
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert y.dtype == np.int64 and len(y) == len(x)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_split_is_deterministic_stratified_and_disjoint():
    a, b = load_digits_data(seed=0), load_digits_data(seed=0)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert len(a.x_test) == 450 and len(a.x_train) == 1347
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47
    train_rows = {row.tobytes() for row in a.x_train}
    overlap = sum(row.tobytes() in train_rows for row in a.x_test)
    assert overlap == 0


def test_calibration_images_come_from_training_split(trained):
    calib = calibration_images(trained.data, count=200)
    assert calib.shape == (200, 1, 8, 8)
    train_rows = {row.tobytes() for row in trained.data.x_train}
    assert all(row.tobytes() in train_rows for row in calib)
