"""The Open Inference Protocol (KServe v2) REST API on the local server (``agent.api``):

    GET  /v2/health/live                         200 while the agent runs
    GET  /v2/health/ready                        200 once models are served, else 400
    GET  /v2                                     server metadata
    GET  /v2/models/<m>[/versions/<v>]           model metadata (-1 for dynamic dims)
    GET  /v2/models/<m>[/versions/<v>]/ready     200 ready, 404 unknown model or version
    POST /v2/models/<m>[/versions/<v>]/infer     JSON tensors, or the binary tensor data
                                                 extension (Inference-Header-Content-Length)

Versions are what the device holds: the served one, and the kept one during a trial or the
candidate during a shadow run. Errors are ``{"error": "..."}`` with the status of the
protocol (400 bad request, 404 unknown model or version, 413 body over the model's cap).
"""

from __future__ import annotations

import zlib
from typing import Any

from edgeship.agent import oip
from edgeship.agent.api_routes import (HttpError, Request, Response, Route, json_response,
                                       v2_error)
from edgeship.agent.api_limits import body_caps
from edgeship.agent.errors import EdgeshipError, InferenceInputError
from edgeship.agent.serving import ModelNotFoundError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_TYPE = "application/octet-stream"


def _held(server: Any, req: Request) -> Any:
    try:
        version = oip.parse_version(req.params.get("version"))
        return oip.resolve(server.models, req.params["model"], version), version
    except oip.OipError as e:
        raise HttpError(e.status, str(e)) from e


def live(server: Any, req: Request) -> Response:
    return json_response(200, {"live": True})


def ready(server: Any, req: Request) -> Response:
    why = oip.server_ready(server.models)
    if why is not None:
        raise HttpError(400, f"not ready: {why}")
    return json_response(200, {"ready": True})


def metadata(server: Any, req: Request) -> Response:
    return json_response(200, oip.server_metadata())


def model_metadata(server: Any, req: Request) -> Response:
    loaded, _ = _held(server, req)
    versions = server.models.versions(loaded.installed.model)
    return json_response(200, oip.model_metadata(loaded, versions))


def model_ready(server: Any, req: Request) -> Response:
    loaded, _ = _held(server, req)
    return json_response(200, {"name": loaded.installed.model,
                               "version": str(loaded.installed.version), "ready": True})


def infer(server: Any, req: Request) -> Response:
    loaded, version = _held(server, req)
    try:
        request = oip.parse_rest_request(*_read(server, req, loaded))
        specs = loaded.installed.manifest.inputs
        oip.check_datatypes(specs, request.inputs)
        outputs, loaded, rid = server.models.predict_tracked(
            loaded.installed.model, oip.model_inputs(specs, request.inputs),
            check_values=True, version=version)
        names = [o.name for o in loaded.installed.manifest.outputs]
        chunks, header_length = oip.rest_response(
            loaded.installed.model, loaded.installed.version, request,
            oip.select_outputs(names, outputs, request.outputs), rid)
    except oip.OipError as e:
        raise HttpError(e.status, str(e)) from e
    except HttpError:
        raise
    except ModelNotFoundError as e:
        raise HttpError(404, str(e)) from e
    except InferenceInputError as e:
        raise HttpError(400, str(e)) from e
    except EdgeshipError as e:
        raise HttpError(500, str(e)) from e
    if header_length is None:
        return Response(200, "application/json", chunks)
    return Response(200, BINARY_TYPE, chunks, {HEADER_LENGTH: str(header_length)})


def _read(server: Any, req: Request, loaded: Any
          ) -> tuple[bytes | memoryview, int | None]:
    """The body (inflated when the client compressed it, within the same cap) and the
    JSON header's length when binary tensor data follows it."""
    caps = body_caps(loaded.installed.manifest.inputs, server.limits)
    value = req.headers.get(HEADER_LENGTH)
    header_length = None
    if value is not None:
        if not value.strip().isdigit() or len(value) > 18:
            raise oip.OipError(f"bad {HEADER_LENGTH} {value[:30]!r}")
        header_length = int(value)
    cap = caps.json if header_length is None else caps.binary
    encoding = (req.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity" and header_length is not None:
        return req.body_aligned(cap, header_length), header_length  # tensors viewed
    body = req.body(cap)
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, encoding, cap)
    elif encoding != "identity":
        raise HttpError(415, f"Content-Encoding {encoding[:30]!r}: send gzip, deflate or "
                             "none")
    return body, header_length


def _inflate(body: bytes, encoding: str, cap: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, cap + 1)
    except zlib.error as e:
        raise oip.OipError(f"body is not valid {encoding} data: {e}") from e
    if len(data) > cap or inflater.unconsumed_tail:
        raise oip.OipError(f"{encoding} body inflates to more than {cap} bytes", 413)
    return data


def _routes() -> list[Route]:
    routes = [Route("GET", "/v2/health/live", live, v2_error),
              Route("GET", "/v2/health/ready", ready, v2_error),
              Route("GET", "/v2", metadata, v2_error)]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route("GET", base, model_metadata, v2_error),
                   Route("GET", base + "/ready", model_ready, v2_error),
                   Route("POST", base + "/infer", infer, v2_error)]
    return routes


ROUTES = _routes()
