"""ModelInfer on the gRPC wire without protobuf copies (``agent.grpc_wire``): the request's
raw contents cut out as views, the response's tensors written after the message; both
read back by protobuf exactly as protobuf's own encoding."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc")
from google.protobuf.message import DecodeError  # noqa: E402

from edgeship.agent import grpc_wire  # noqa: E402
from edgeship.agent import oip_pb2 as pb  # noqa: E402


def _request(raw: list[bytes]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", model_version="2", id="r")
    req.parameters["p"].string_param = "v"
    for i, data in enumerate(raw):
        req.inputs.add(name=f"in{i}", datatype="UINT8", shape=[len(data)])
    req.outputs.add(name="o")
    req.raw_input_contents.extend(raw)
    return req


@pytest.mark.parametrize("split_min", [0, 1 << 30])
def test_request_parses_like_protobuf(monkeypatch, split_min):
    monkeypatch.setattr(grpc_wire, "SPLIT_MIN_BYTES", split_min)
    raw = [bytes(range(256)) * 300, b"", b"\x01\x02\x03"]
    data = _request(raw).SerializeToString()
    call = grpc_wire.parse_infer(data)
    assert [bytes(r) for r in call.raw] == raw and call.size == len(data)
    expected = _request(raw)
    if split_min == 0:  # cut out: the message holds everything else
        assert isinstance(call.raw[0], memoryview)
        del expected.raw_input_contents[:]
    assert call.message == expected


def test_a_malformed_request_is_refused_by_protobuf(monkeypatch):
    monkeypatch.setattr(grpc_wire, "SPLIT_MIN_BYTES", 0)
    data = _request([b"\x00" * 100]).SerializeToString()
    for bad in (data[:-1], b"\x3a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x3a\x10ab"):
        with pytest.raises(DecodeError):
            grpc_wire.parse_infer(bad)
    # a varint field at the top level: not cut, protobuf decides (an unknown field)
    assert grpc_wire.parse_infer(b"\x78\x01" + data).message.model_name == "m"


def test_answer_serializes_like_protobuf():
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([], np.int64)]
    msg = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    msg.parameters["edgeship_request_id"].string_param = "r"
    for i, a in enumerate(arrays):
        msg.outputs.add(name=f"o{i}", datatype="FP32", shape=a.shape)
    wire = grpc_wire.serialize_answer(grpc_wire.InferAnswer(
        msg, [a.data.cast("B") if a.size else b"" for a in arrays]))
    whole = pb.ModelInferResponse()
    whole.CopyFrom(msg)
    whole.raw_output_contents.extend(a.tobytes() for a in arrays)
    assert pb.ModelInferResponse.FromString(wire) == whole
    assert grpc_wire.serialize_answer(pb.ServerLiveResponse(live=True)) == \
        pb.ServerLiveResponse(live=True).SerializeToString()
