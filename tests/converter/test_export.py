from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeship.converter.errors import ExportError, QuantizeError
from edgeship.converter.evaluate import open_session
from edgeship.converter.export import ExportSettings, export_onnx
from edgeship.converter.quantize import quantize_int8_static
from edgeship.converter.samples import Samples


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("cannot trace me")


@pytest.mark.parametrize("prefer_dynamo", [True, False])
def test_export_has_dynamic_batch_and_matches_torch(trained, tmp_path, prefer_dynamo):
    path = export_onnx(trained.model, trained.data.x_train[:1], tmp_path / "m.onnx",
                       ExportSettings(prefer_dynamo=prefer_dynamo))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no external data
    x = trained.data.x_test[:7]
    out = open_session(path).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = trained.model(torch.from_numpy(x)).numpy()
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_unexportable_model_raises_export_error(tmp_path):
    with pytest.raises(ExportError, match="could not export _Broken"):
        export_onnx(_Broken(), np.zeros((1, 1, 8, 8), np.float32), tmp_path / "m.onnx")


def test_quantize_that_fails_on_every_fallback_leaves_nothing(trained, tmp_path,
                                                              monkeypatch):
    fp32 = export_onnx(trained.model, trained.data.x_train[:1], tmp_path / "m.onnx",
                       ExportSettings(prefer_dynamo=False))
    wrong = Samples({"input": np.zeros((2, 1, 3, 5, 5), np.float32)})  # not 1x8x8 images
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantizeError, match="static INT8 failed on every fallback") as err:
        quantize_int8_static(fp32, tmp_path / "q.onnx", wrong)
    for rung in ("symbolic", "onnx", "fixed-shapes", "none"):
        assert f"({rung}" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # cwd stays clean
