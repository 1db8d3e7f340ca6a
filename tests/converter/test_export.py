from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeship.converter.errors import ExportError, QuantizeError
from edgeship.converter.evaluate import open_session
from edgeship.converter.export import ExportSettings, export_onnx
from edgeship.converter.quantize import quantize_int8_static


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


def test_quantize_rejects_empty_calibration(trained, tmp_path):
    fp32 = export_onnx(trained.model, trained.data.x_train[:1], tmp_path / "m.onnx",
                       ExportSettings(prefer_dynamo=False))
    with pytest.raises(QuantizeError, match="calibration"):
        quantize_int8_static(fp32, tmp_path / "q.onnx", np.zeros((0, 1, 8, 8)))
    assert not (tmp_path / "q.onnx").exists()
