"""ModelInfer's tensors on the gRPC wire without copies through protobuf.

A ``ModelInferRequest`` parsed by protobuf copies ``raw_input_contents`` into the message,
and reading the field copies it again into a ``bytes`` object; a response's
``raw_output_contents`` is copied into the message and again when it is serialized. For a
1x3x320x320 image that is megabytes per call. Here the request's raw contents (field 7, a
top-level length-delimited field) are cut out of the received bytes as views and the rest
goes to protobuf; the response is protobuf's serialization of everything but the tensors,
followed by one field 6 record per output tensor, written from the tensor's memory. Both
are plain protobuf wire format: a message's fields may come in any order, and a repeated
field's records are appended.

Small requests (below :data:`SPLIT_MIN_BYTES`) go to protobuf whole: for them the copies
cost less than walking the fields in Python.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from edgeship.agent import oip_pb2

pb: Any = oip_pb2

SPLIT_MIN_BYTES = 64 * 1024
_RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents (field 6, length-delimited)
_LENGTH_DELIMITED = 2


class InferCall(NamedTuple):
    """A received ModelInferRequest: the message (raw contents left out when ``raw`` holds
    them), the raw input contents, and the request's size on the wire."""

    message: Any
    raw: Sequence[bytes | memoryview]
    size: int


class InferAnswer(NamedTuple):
    """A ModelInferResponse without its raw_output_contents, and those tensors' bytes."""

    message: Any
    chunks: list[bytes | memoryview]


def parse_infer(data: bytes) -> InferCall:
    """The request's message and raw contents; anything but well-formed top-level fields
    goes to protobuf whole (which refuses what is not a message)."""
    if len(data) >= SPLIT_MIN_BYTES:
        try:
            rest, raw = _split_raw(data)
        except ValueError:
            pass
        else:
            return InferCall(pb.ModelInferRequest.FromString(rest), raw, len(data))
    msg = pb.ModelInferRequest.FromString(data)
    return InferCall(msg, msg.raw_input_contents, len(data))


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]]:
    """(the message's bytes without field 7, views of each field 7 value in order)."""
    view = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    at = kept = 0
    end = len(data)
    while at < end:
        tag, start = _read_varint(data, at)
        if tag & 7 != _LENGTH_DELIMITED:
            raise ValueError("not a length-delimited field")
        size, start = _read_varint(data, start)
        stop = start + size
        if stop > end:
            raise ValueError("field longer than the message")
        if tag >> 3 == _RAW_INPUT_FIELD:
            rest.append(view[kept:at])
            raw.append(view[start:stop])
            kept = stop
        at = stop
    rest.append(view[kept:])
    return b"".join(rest), raw


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if at >= len(data):
            raise ValueError("message ends inside a varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    raise ValueError("varint longer than 64 bits")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def serialize_answer(answer: Any) -> bytes:
    """An InferAnswer on the wire (any other message: protobuf's serialization)."""
    if not isinstance(answer, InferAnswer):
        return answer.SerializeToString()
    parts: list[bytes | memoryview] = [answer.message.SerializeToString()]
    for chunk in answer.chunks:
        parts += (_RAW_OUTPUT_TAG, _varint(len(chunk)), chunk)
    return b"".join(parts)
