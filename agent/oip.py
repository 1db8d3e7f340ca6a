"""The Open Inference Protocol (KServe v2) without a transport: datatypes, tensors from JSON,
from the binary tensor data extension and from gRPC raw contents, the response documents,
metadata, and errors with their HTTP status and gRPC code.

Pure functions of bytes and parsed documents; ``agent.api_v2`` serves them over HTTP and
``agent.grpc_api`` over gRPC.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, cast

import numpy as np

from edgeship.agent import __version__
from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.agent.jsonarray import JsonTensorError, as_array, loads

SERVER_NAME = "edgeship-agent"
EXTENSIONS = ("binary_tensor_data", "parameters")

#: protocol datatype -> NumPy dtype name
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
             "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
             "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
             "BYTES": "object"}
_BY_DTYPE = {v: k for k, v in DATATYPES.items()} | {"string": "BYTES", "str": "BYTES"}
_BY_NP_DTYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
_LITTLE_ENDIAN = sys.byteorder == "little"
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}
#: HTTP status -> gRPC status code name
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
              415: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}
#: the response parameter naming the prediction for feedback (``/v1/models/<m>/feedback``)
REQUEST_ID_PARAMETER = "edgeship_request_id"
#: request parameters this server refuses rather than silently ignores
_REFUSED_PARAMETERS = {
    "sequence_id": "sequence batching is not supported: pass the state tensors in as inputs",
    "classification": "the classification extension is not supported",
}


class OipError(EdgeshipError):
    """A request the protocol answers with an error body; ``status`` is the HTTP status
    (``grpc_code`` the matching gRPC code)."""

    reason_code = Reason.BAD_REQUEST

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    @property
    def grpc_code(self) -> str:
        return GRPC_CODES.get(self.status, "UNKNOWN")

    def body(self) -> bytes:
        return json.dumps({"error": str(self)}).encode()


def datatype_of(dtype: Any) -> str:
    if isinstance(dtype, np.dtype):
        found = _BY_NP_DTYPE.get(dtype)
        if found is not None:
            return found
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    try:
        return _BY_DTYPE[name]
    except KeyError:
        raise OipError(f"dtype {name} has no Open Inference Protocol datatype", 500) from None


def dtype_of(datatype: Any, what: str) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise OipError(f"{what}: unknown datatype {str(datatype)[:40]!r}")
    return np.dtype(DATATYPES[datatype])


# --- requests --------------------------------------------------------------------------------

@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str = ""
    outputs: list[str] | None = None  # requested output names; None: every output
    binary: set[str] = field(default_factory=set)  # outputs to send as binary data
    binary_default: bool = False  # request parameter binary_data_output


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is list and len(value) <= 32:
        for d in value:
            if type(d) is not int or not 0 <= d < 2**40:
                break
        else:
            return tuple(value)
    raise OipError(f"{what}: shape must be a list of non-negative integers")


def _params(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OipError(f"{what}: parameters must be an object")
    for key, why in _REFUSED_PARAMETERS.items():
        if key in value:
            raise OipError(f"{what}: {why}")
    return value


def parse_rest_request(body: bytes | memoryview, header_length: int | None) -> InferRequest:
    """A REST inference request: JSON, or (``header_length`` given) a JSON header followed by
    the binary data of the inputs that declare ``binary_data_size``, in their order."""
    binary: bytes | memoryview = b""
    head = body
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise OipError(f"Inference-Header-Content-Length {header_length} does not fit "
                           f"a body of {len(body)} bytes")
        view = memoryview(body)
        head, binary = view[:header_length], view[header_length:]
    try:
        doc = loads(head)
    except JsonTensorError as e:
        raise OipError(str(e), 413 if e.too_large else 400) from e
    listed = doc.get("inputs") if type(doc) is dict else None
    if type(listed) is not list or not listed:
        raise OipError('request must be an object with a non-empty "inputs" list')
    inputs: dict[str, np.ndarray] = {}
    used = 0
    for i, raw in enumerate(listed):
        name, arr, size = _rest_input(raw, i, binary, used)
        if name in inputs:
            raise OipError(f"input {name!r} given twice")
        inputs[name] = arr
        used += size
    if used != len(binary):
        raise OipError(f"{len(binary) - used} bytes of binary data belong to no input")
    params, rid, outputs = doc.get("parameters"), doc.get("id"), doc.get("outputs")
    req = InferRequest(inputs=inputs, id="" if rid is None else _request_id(rid),
                       binary_default=params is not None and _params(
                           params, "request").get("binary_data_output") is True)
    if outputs is not None:
        _requested_outputs(req, outputs)
    return req


def _request_id(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise OipError("id must be a string of at most 256 characters")
    return value


def _rest_input(raw: Any, i: int, binary: bytes | memoryview, used: int
                ) -> tuple[str, np.ndarray, int]:
    """(name, tensor, bytes of binary data it took from ``binary[used:]``)."""
    name = raw.get("name") if type(raw) is dict else None
    if type(name) is not str:
        raise OipError(f"inputs[{i}] must be an object with a name")
    what = f"input {name[:100]!r}"
    shape = _shape(raw.get("shape"), what)
    datatype = cast(str, raw.get("datatype"))  # dtype_of refuses anything else
    dtype = dtype_of(datatype, what)
    params = raw.get("parameters")
    size = None if params is None else _params(params, what).get("binary_data_size")
    if size is not None:
        left = len(binary) - used
        if type(size) is not int or not 0 <= size <= left:
            raise OipError(f"{what}: binary_data_size {str(size)[:30]} exceeds the "
                           f"{left} bytes of binary data left")
        if "data" in raw:
            raise OipError(f"{what}: both data and binary_data_size")
        data = binary[used:used + size]
        return name, tensor_from_bytes(data, datatype, shape, what), size
    if "data" not in raw:
        raise OipError(f"{what}: no data and no binary_data_size")
    return name, _json_tensor(raw["data"], datatype, dtype, shape, what), 0


def _json_tensor(data: Any, datatype: str, dtype: np.dtype, shape: tuple[int, ...],
                 what: str) -> np.ndarray:
    if datatype == "BYTES":
        arr = _bytes_from_json(data, what)
    else:
        try:
            arr = as_array(data, dtype, what)
        except JsonTensorError as e:
            raise OipError(str(e)) from e
    if arr.size != math.prod(shape):
        raise OipError(f"{what}: {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape)


def _bytes_from_json(data: Any, what: str) -> np.ndarray:
    flat = list(_flatten(data, what))
    if not all(isinstance(s, str) for s in flat):
        raise OipError(f"{what}: BYTES data must be strings")
    return np.array([s.encode() for s in flat], dtype=object)


def _flatten(data: Any, what: str, depth: int = 0) -> Iterable[Any]:
    if depth > 32:
        raise OipError(f"{what}: nested too deeply")
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item, what, depth + 1)
    else:
        yield data


def tensor_from_bytes(raw: bytes | memoryview, datatype: str, shape: Sequence[int],
                      what: str) -> np.ndarray:
    """A tensor from its row-major bytes (binary extension, gRPC raw contents); no copy
    unless the data is misaligned."""
    dtype = dtype_of(datatype, what)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_raw(raw, count, what).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise OipError(f"{what}: {len(raw)} bytes for shape {list(shape)} of {datatype} "
                       f"({count * dtype.itemsize} expected)")
    wire = dtype if _LITTLE_ENDIAN else dtype.newbyteorder("<")
    arr = np.frombuffer(raw, dtype=wire, count=count)
    if not arr.dtype.isnative or not arr.flags.aligned:
        arr = arr.astype(dtype)
    return arr.reshape(shape)


def _bytes_from_raw(raw: bytes | memoryview, count: int, what: str) -> np.ndarray:
    items, at, data = [], 0, bytes(raw)
    for _ in range(count):
        if at + 4 > len(data):
            raise OipError(f"{what}: BYTES data ends early")
        (n,) = struct.unpack_from("<I", data, at)
        if at + 4 + n > len(data):
            raise OipError(f"{what}: BYTES element longer than the data")
        items.append(data[at + 4:at + 4 + n])
        at += 4 + n
    if at != len(data):
        raise OipError(f"{what}: {len(data) - at} bytes after the last BYTES element")
    return np.array(items, dtype=object)


def _requested_outputs(req: InferRequest, raw: Any) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise OipError('"outputs" must be a list')
    names = []
    for i, out in enumerate(raw):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise OipError(f"outputs[{i}] must be an object with a name")
        params = _params(out.get("parameters"), f"output {out['name'][:100]!r}")
        names.append(out["name"])
        binary = params.get("binary_data", req.binary_default)
        if binary is True:
            req.binary.add(out["name"])
    req.outputs = names


# --- responses -------------------------------------------------------------------------------

def tensor_bytes(arr: np.ndarray) -> bytes:
    """Row-major little-endian bytes of a tensor (BYTES: 4-byte length before each)."""
    return bytes(tensor_view(arr))


def tensor_view(arr: np.ndarray) -> bytes | memoryview:
    """``tensor_bytes`` without the copy where the tensor's memory already has that layout
    (a memoryview of it, for writing to a socket)."""
    if arr.dtype.kind in "OSU":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in arr.ravel()]
        return b"".join(struct.pack("<I", len(b)) + b for b in items)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.data.cast("B") if arr.size else b""


def select_outputs(names: Sequence[str], values: Sequence[np.ndarray],
                   wanted: list[str] | None) -> list[tuple[str, np.ndarray]]:
    if wanted is None:
        return list(zip(names, values))
    by_name = dict(zip(names, values))
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise OipError(f"unknown output {unknown[0][:100]!r}; the model has {list(names)}")
    return [(n, by_name[n]) for n in wanted]


def rest_response(model: str, version: int, req: InferRequest, outputs: list[tuple[
        str, np.ndarray]], request_id: str | None = None
                  ) -> tuple[list[bytes | memoryview], int | None]:
    """The response body as chunks, and the JSON header's length when binary data follows
    (None: the body is JSON only). ``request_id``: the id feedback refers to, in the
    response's ``parameters`` (and as its ``id`` when the client sent none)."""
    docs, chunks = [], []
    for name, arr in outputs:
        head = f'{{"name": {_quoted(name)}, "datatype": "{datatype_of(arr.dtype)}", ' \
               f'"shape": {list(arr.shape)}'
        if name in req.binary or (req.outputs is None and req.binary_default):
            data = tensor_view(arr)
            docs.append(f'{head}, "parameters": {{"binary_data_size": {len(data)}}}}}')
            chunks.append(data)
        else:
            docs.append(f'{head}, "data": {json_numbers(arr)}}}')
    text = f'{{"model_name": {_quoted(model)}, "model_version": "{version}", ' \
           f'"outputs": [{", ".join(docs)}]'
    if req.id or request_id:
        text += f', "id": {_dumps(req.id or request_id)}'
    if request_id:
        text += f', "parameters": {{"{REQUEST_ID_PARAMETER}": {_dumps(request_id)}}}'
    header = (text + "}").encode()
    return [header, *chunks], (len(header) if chunks else None)


_dumps = json.dumps
_QUOTED: dict[str, str] = {}  # model and tensor names as JSON strings (they repeat)


def _quoted(name: str) -> str:
    found = _QUOTED.get(name)
    if found is None:
        found = _dumps(name)
        if len(_QUOTED) < 4096:
            _QUOTED[name] = found
    return found

_FLOAT32 = "%.9g"  # 9 significant digits: every float32 and float16 reads back


def json_numbers(arr: np.ndarray) -> str:
    """A tensor's values as a flat JSON array. float32/float16: 9 significant digits,
    which read back as the same float32/float16 (a whole number is written without ".0",
    -0.0 as -0), several times faster than Python's shortest float64 repr; NaN and
    infinity as Python's json writes them."""
    kind = arr.dtype.kind
    if kind in "OSU":
        return _dumps([x.decode(errors="replace") if isinstance(x, bytes) else str(x)
                       for x in arr.ravel()])
    values = arr.ravel().tolist()
    if kind == "f" and arr.dtype.itemsize <= 4:
        text = ", ".join(map(_FLOAT32.__mod__, values))
        if "n" not in text:  # no "nan" or "inf": all finite
            return f"[{text}]"
    return _dumps(values)


# --- metadata --------------------------------------------------------------------------------

def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def tensor_metadata(specs: Iterable[Any]) -> list[dict[str, Any]]:
    """Manifest tensor specs as protocol metadata (-1 for each dynamic dimension)."""
    return [{"name": s.name, "datatype": datatype_of(s.dtype),
             "shape": [-1 if d is None else int(d) for d in s.shape]} for s in specs]


def model_metadata(loaded: Any, versions: Iterable[int]) -> dict[str, Any]:
    inst = loaded.installed
    return {"name": inst.model, "versions": [str(v) for v in versions],
            "platform": PLATFORMS.get(inst.variant.runtime, inst.variant.runtime),
            "inputs": tensor_metadata(inst.manifest.inputs),
            "outputs": tensor_metadata(inst.manifest.outputs)}


def parse_version(text: str | None) -> int | None:
    """A version from a path or request ('' or None: whatever is being served)."""
    if not text:
        return None
    if not text.isdigit() or len(text) > 19:
        raise OipError(f"no version {text[:40]!r}: versions are numbers", 404)
    return int(text)


# --- what the device holds ---------------------------------------------------------------------

def resolve(models: Any, name: str, version: int | None) -> Any:
    """The loaded model a request names: the served version, or a version the device holds
    beside it (kept during a trial, the candidate during a shadow run); 404 otherwise."""
    served = models.find(name)
    if served is None:
        raise OipError(f"no model named {name[:100]!r} is being served", 404)
    if version is None or version == served.installed.version:
        return served
    held = models.versions(name)
    if version not in held:
        raise OipError(f"{name} has no version {version} on this device (it holds "
                       f"{', '.join(map(str, held)) or 'none'})", 404)
    return held[version]


def check_datatypes(specs: Sequence[Any], inputs: dict[str, np.ndarray]) -> None:
    """Each input's datatype is the one the model declares (the protocol converts
    nothing)."""
    for spec in specs:
        arr = inputs.get(spec.name)
        if arr is not None and arr.dtype != _np_dtype(spec.dtype) and not (
                arr.dtype == object and datatype_of(spec.dtype) == "BYTES"):
            raise OipError(f"input {spec.name!r}: datatype {datatype_of(arr.dtype)}, the "
                           f"model takes {datatype_of(spec.dtype)}")


_NP_DTYPES: dict[str, np.dtype] = {}


def _np_dtype(name: str) -> np.dtype:
    found = _NP_DTYPES.get(name)
    if found is None:
        found = _NP_DTYPES[name] = np.dtype(DATATYPES.get(_BY_DTYPE.get(name, ""), name))
    return found


def model_inputs(specs: Sequence[Any], inputs: dict[str, np.ndarray]) -> Any:
    """What ``ModelServer.predict`` takes: the array itself for a one-input model (its fast
    path), else the dict."""
    if len(specs) == 1 and len(inputs) == 1 and specs[0].name in inputs:
        return inputs[specs[0].name]
    return inputs


def server_ready(models: Any) -> str | None:
    """None when ready; else why not."""
    if not models.ready:
        return "the agent is starting"
    if not models.models():
        return "no model is being served yet"
    return None
