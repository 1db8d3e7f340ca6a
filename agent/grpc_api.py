"""The Open Inference Protocol's ``GRPCInferenceService`` (ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer) on a Unix socket and, when
configured, a TCP port (loopback unless configured otherwise).

Optional: needs ``grpcio`` and ``protobuf`` (``pip install 'edgeship[grpc]'``); the message
classes are generated from ``agent/oip.proto`` into ``agent/oip_pb2.py`` (committed). Inputs
come as ``raw_input_contents`` or typed ``contents``; outputs always go back as
``raw_output_contents``. Errors carry the protocol's status codes (INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL).
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from edgeship.agent import oip
from edgeship.agent import oip_pb2
from edgeship.agent.grpc_wire import InferAnswer, InferCall, parse_infer, serialize_answer
from edgeship.agent.api_limits import ApiLimits, body_caps
from edgeship.agent.errors import EdgeshipError, InferenceInputError
from edgeship.agent.jsonarray import JsonTensorError, as_array
from edgeship.agent.serving import ModelNotFoundError, ModelServer

pb: Any = oip_pb2  # protoc builds its message classes at import time: no static types

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
#: typed contents field per datatype (FP16 only travels raw)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             "BYTES": "bytes_contents"}
GRPC_WORKERS = 4


class _Service:
    def __init__(self, models: ModelServer, limits: ApiLimits) -> None:
        self.models = models
        self.limits = limits

    def server_live(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=oip.server_ready(self.models) is None)

    def model_ready(self, request: Any, context: Any) -> Any:
        try:
            oip.resolve(self.models, request.name, oip.parse_version(request.version))
        except oip.OipError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def server_metadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    def model_metadata(self, request: Any, context: Any) -> Any:
        loaded = oip.resolve(self.models, request.name, oip.parse_version(request.version))
        doc = oip.model_metadata(loaded, self.models.versions(loaded.installed.model))
        return pb.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc["outputs"]])

    def model_infer(self, call: "InferCall", context: Any) -> Any:
        request = call.message
        version = oip.parse_version(request.model_version)
        loaded = oip.resolve(self.models, request.model_name, version)
        specs = loaded.installed.manifest.inputs
        cap = body_caps(specs, self.limits).binary
        if call.size > cap:
            raise oip.OipError(f"request of {call.size} bytes exceeds the {cap}-byte cap "
                               f"of {request.model_name}", 413)
        inputs = grpc_inputs(request, call.raw)
        oip.check_datatypes(specs, inputs)
        try:
            outputs, loaded, rid = self.models.predict_tracked(
                loaded.installed.model, oip.model_inputs(specs, inputs), check_values=True,
                version=version)
        except ModelNotFoundError as e:
            raise oip.OipError(str(e), 404) from e
        except InferenceInputError as e:
            raise oip.OipError(str(e)) from e
        except EdgeshipError as e:
            raise oip.OipError(str(e), 500) from e
        return _infer_response(request, loaded, outputs, rid)


def _infer_response(request: Any, loaded: Any, outputs: list[np.ndarray],
                    rid: str | None) -> "InferAnswer":
    """The response message without its tensors, and the tensors' bytes (written after
    it on the wire by :func:`_serialize_answer`, without copies through protobuf)."""
    inst = loaded.installed
    names = [o.name for o in inst.manifest.outputs]
    wanted = [o.name for o in request.outputs] or None
    msg = pb.ModelInferResponse(model_name=inst.model, model_version=str(inst.version),
                                id=request.id or rid or "")
    if rid is not None:
        msg.parameters[oip.REQUEST_ID_PARAMETER].string_param = rid
    chunks = []
    for name, arr in oip.select_outputs(names, outputs, wanted):
        out = msg.outputs.add(name=name, datatype=oip.datatype_of(arr.dtype))
        out.shape.extend(arr.shape)
        chunks.append(oip.tensor_view(arr))
    return InferAnswer(msg, chunks)


def grpc_inputs(request: Any, raw: Sequence[bytes | memoryview] = ()
                ) -> dict[str, np.ndarray]:
    """name -> array from a ModelInferRequest: ``raw`` holds its raw_input_contents (cut
    out of the wire bytes by :func:`parse_infer`), else the typed contents are read."""
    tensors = request.inputs
    if raw and len(raw) != len(tensors):
        raise oip.OipError(f"{len(raw)} raw_input_contents for {len(tensors)} inputs")
    if "sequence_id" in request.parameters:
        raise oip.OipError("sequence batching is not supported: pass the state tensors in "
                           "as inputs")
    inputs = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        what = f"input {name[:100]!r}"
        shape = tuple(tensor.shape)
        if shape and min(shape) < 0:
            raise oip.OipError(f"{what}: negative dimension in shape {list(shape)}")
        if name in inputs:
            raise oip.OipError(f"input {name!r} given twice")
        if raw:
            inputs[name] = oip.tensor_from_bytes(raw[i], tensor.datatype, shape, what)
        else:
            inputs[name] = _typed(tensor, shape, what)
    return inputs


def _typed(tensor: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    dtype = oip.dtype_of(tensor.datatype, what)
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise oip.OipError(f"{what}: {tensor.datatype} data must be sent as "
                           "raw_input_contents")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        arr = np.array(list(values), dtype=object)
    else:
        try:
            arr = as_array(np.asarray(values), dtype, what)
        except JsonTensorError as e:
            raise oip.OipError(str(e)) from e
    if arr.size != int(np.prod(shape)):
        raise oip.OipError(f"{what}: {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape)


def _guarded(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Protocol errors become gRPC statuses; anything else INTERNAL (the server goes on)."""
    def call(request: Any, context: Any) -> Any:
        try:
            return method(request, context)
        except oip.OipError as e:
            context.abort(getattr(grpc.StatusCode, e.grpc_code), str(e))
        except Exception:
            logger.exception("grpc: unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
    return call


def _handlers(service: _Service) -> dict[str, Any]:
    def serialize(msg: Any) -> bytes:
        return msg.SerializeToString()

    calls = {"ServerLive": (service.server_live, pb.ServerLiveRequest),
             "ServerReady": (service.server_ready, pb.ServerReadyRequest),
             "ModelReady": (service.model_ready, pb.ModelReadyRequest),
             "ServerMetadata": (service.server_metadata, pb.ServerMetadataRequest),
             "ModelMetadata": (service.model_metadata, pb.ModelMetadataRequest)}
    handlers = {name: grpc.unary_unary_rpc_method_handler(
        _guarded(fn), request_deserializer=request_type.FromString,
        response_serializer=serialize) for name, (fn, request_type) in calls.items()}
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        _guarded(service.model_infer), request_deserializer=parse_infer,
        response_serializer=serialize_answer)
    return handlers


class GrpcInferenceServer:
    """One gRPC server on a Unix socket and/or a TCP address."""

    def __init__(self, models: ModelServer, limits: ApiLimits, *,
                 socket_path: Path | None = None, host: str = "127.0.0.1",
                 port: int | None = None, max_message_bytes: int = 0) -> None:
        self.socket_path = Path(socket_path) if socket_path else None
        cap = max_message_bytes or limits.max_request_bytes or limits.max_body_bytes
        options = [("grpc.max_receive_message_length", cap),
                   ("grpc.max_send_message_length", -1),
                   ("grpc.so_reuseport", 0),  # a second process must not share the port
                   ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
                   ("grpc.max_concurrent_streams", 16)]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS,
                                       thread_name_prefix="edgeship-grpc"),
            options=options, maximum_concurrent_rpcs=limits.max_connections)
        handlers = _handlers(_Service(models, limits))
        if hasattr(self._server, "add_registered_method_handlers"):  # grpcio >= 1.63
            # registered with grpc core by name: no generic lookup per call
            self._server.add_registered_method_handlers(SERVICE, handlers)
        else:
            self._server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(SERVICE, handlers)])
        self.port: int | None = None
        self.host = host
        if self.socket_path is not None:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            if self.socket_path.is_socket():
                self.socket_path.unlink()
            self._server.add_insecure_port(f"unix://{self.socket_path}")
        if port is not None:
            try:
                bound = self._server.add_insecure_port(_address(host, port))
            except RuntimeError:
                bound = 0
            if bound == 0:
                raise OSError(f"cannot bind gRPC to {host}:{port} (taken by another "
                              "process?)")
            self.port = bound

    @property
    def urls(self) -> list[str]:
        urls = [f"unix://{self.socket_path}"] if self.socket_path else []
        if self.port is not None:
            urls.append(f"{self.host}:{self.port}")
        return urls

    def start(self) -> None:
        self._server.start()
        if self.socket_path is not None:
            os.chmod(self.socket_path, 0o660)

    def stop(self) -> None:
        self._server.stop(grace=1.0).wait(5)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
