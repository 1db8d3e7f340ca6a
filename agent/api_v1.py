"""The edgeship API on the local server (``agent.api``):

    GET  /healthz                      liveness, the number of models served, and (the
                                       agent's) MQTT state with its last contact
    POST /v1/admin/install             {"archive": "/path.tar"}: install a signed release
                                       archive (Unix socket only; ``agent install FILE``)
    GET  /metrics                      Prometheus text (same numbers as telemetry)
    GET  /v1/models                    every model with its signature and body caps
    GET  /v1/models/<name>             one model
    POST /v1/models/<name>/predict     inputs as JSON ({"inputs": [...]} for one input,
                                       {"inputs": {name: [...], ...}} for any number),
                                       as .npy (one input) or as .npz (one array per input
                                       name); the answer is JSON with every output by name,
                                       or with ``Accept: application/x-npz`` an .npz of every
                                       output, or with ``Accept: application/x-npy`` the
                                       first output as .npy (headers name the model);
                                       ``id`` (and X-Edgeship-Request-Id) names the
                                       prediction for feedback
    POST /v1/models/<name>/feedback    the true label or value of earlier predictions by
                                       id, one or a batch (``agent.quality.feedback``)
    GET  /v1/models/<name>/quality     labelled metrics per version, drift per signal, the
                                       label-free accuracy estimate, feedback counters

Bad requests get a 4xx with a message, never a crash: 400 bad body/shape/dtype, 404 unknown
model or path, 408 body not sent in time, 411 no length, 413 body too large (checked before
it is read: the cap comes from the model's input size), 415 unknown content type. Anything
unexpected is a 500 and the server keeps going.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.api_routes import HttpError, Request, Response, Route, json_response
from edgeship.agent.api_limits import body_caps
from edgeship.agent.errors import EdgeshipError, InferenceInputError
from edgeship.agent.npyio import NPY_TYPE, NPZ_TYPE, dump_npy, dump_npz, load_npy, load_npz
from edgeship.agent.quality.feedback import STATUS_HTTP, FeedbackError
from edgeship.agent.serving import LoadedModel, ModelNotFoundError

JSON_TYPES = ("application/json", "text/json", "")
FEEDBACK_MAX_BYTES = 4 * 1024 * 1024  # 10,000 items with a few labels each


def describe(server: Any, loaded: LoadedModel) -> dict[str, Any]:
    caps = body_caps(loaded.installed.manifest.inputs, server.limits)
    return loaded.describe() | {"max_request_bytes": {"binary": caps.binary,
                                                      "json": caps.json}}


def healthz(server: Any, req: Request) -> Response:
    doc = {"status": "ok", "models": len(server.models.models())}
    if server.health_info is not None:  # the agent's: MQTT state and last contact
        doc.update(server.health_info())
    return json_response(200, doc)


def install_archive(server: Any, req: Request) -> Response:
    """``edgeship agent install FILE`` hands a signed release archive to the running agent
    (the Unix socket only: the agent's user and group)."""
    if server.install_archive is None:
        raise HttpError(404, "no such endpoint on this listener (the agent's Unix socket "
                             "has it)")
    try:
        path = json.loads(req.body(4096, "install request"))["archive"]
    except (ValueError, KeyError, TypeError):
        raise HttpError(400, 'the body must be {"archive": "/absolute/path.tar"}') from None
    if not isinstance(path, str) or not path.startswith("/"):
        raise HttpError(400, "archive must be an absolute path")
    try:
        doc = server.install_archive(Path(path))
    except EdgeshipError as e:  # not an archive, unreadable
        raise HttpError(400, str(e)) from e
    return json_response(200, doc)


def metrics(server: Any, req: Request) -> Response:
    if server.metrics_text is None:
        raise HttpError(404, "no metrics on this server")
    return Response(200, "text/plain; version=0.0.4", [server.metrics_text()])


def list_models(server: Any, req: Request) -> Response:
    return json_response(200, {"models": [describe(server, m) for m in server.models.models()]})


def one_model(server: Any, req: Request) -> Response:
    return json_response(200, describe(server, _served(server, req)))


def _served(server: Any, req: Request) -> LoadedModel:
    try:
        return server.models.get(req.params["model"])
    except ModelNotFoundError as e:
        raise HttpError(404, str(e)) from e


def predict(server: Any, req: Request) -> Response:
    loaded = _served(server, req)
    name = req.params["model"]
    try:
        raw = read_inputs(server, req, loaded)
        outputs, loaded, rid = server.models.predict_tracked(name, raw, check_values=True)
    except HttpError:
        raise
    except ModelNotFoundError as e:
        raise HttpError(404, str(e)) from e
    except InferenceInputError as e:  # jsonarray.JsonTensorError: too_large is a 413
        raise HttpError(413 if getattr(e, "too_large", False) else 400, str(e)) from e
    except EdgeshipError as e:
        raise HttpError(500, str(e)) from e
    return _answer(req, outputs, loaded, rid)


def read_inputs(server: Any, req: Request, loaded: LoadedModel) -> Any:
    """The request's inputs: one array, or name -> array (JSON values parsed into the
    dtype of the input they are for)."""
    specs = loaded.installed.manifest.inputs
    caps = body_caps(specs, server.limits)
    ctype = req.content_type
    if ctype == NPY_TYPE:
        return load_npy(req.body(caps.binary))
    if ctype == NPZ_TYPE:
        return load_npz(req.body(caps.binary), caps.binary)
    if ctype not in JSON_TYPES:
        raise HttpError(415, f"Content-Type {ctype!r}: send application/json, {NPY_TYPE} "
                             f"or {NPZ_TYPE}")
    from edgeship.agent.jsonarray import as_array, loads  # on the first JSON request
    doc = loads(req.body(caps.json))
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise InferenceInputError('JSON body must be an object with "inputs"')
    inputs = doc["inputs"]
    dtypes = {s.name: s.dtype for s in specs}
    if isinstance(inputs, dict):
        return {k: as_array(v, dtypes[k], f"input {k!r}") if k in dtypes else v
                for k, v in inputs.items()}
    if len(specs) == 1:
        return as_array(inputs, specs[0].dtype, f"input {specs[0].name!r}")
    return inputs  # the signature check explains what a several-input model wants


def _answer(req: Request, outputs: list[np.ndarray], loaded: LoadedModel,
            rid: str | None) -> Response:
    inst = loaded.installed
    names = [o.name for o in inst.manifest.outputs]
    accept = req.headers.get("Accept") or ""
    headers = {"X-Edgeship-Model": inst.model, "X-Edgeship-Version": str(inst.version),
               "X-Edgeship-Variant": inst.variant.id}
    if rid is not None:
        headers["X-Edgeship-Request-Id"] = rid
    if NPZ_TYPE in accept:
        return Response(200, NPZ_TYPE, [dump_npz(dict(zip(names, outputs)))], headers)
    if NPY_TYPE in accept:
        return Response(200, NPY_TYPE, [dump_npy(outputs[0])], headers)
    doc = {"model": inst.model, "version": inst.version, "variant": inst.variant.id,
           "outputs": {n: o.tolist() for n, o in zip(names, outputs)}}
    if rid is not None:
        doc["id"] = rid
    resp = json_response(200, doc)
    resp.headers.update(headers)
    return resp


def feedback(server: Any, req: Request) -> Response:
    hub = _hub(server)
    name = req.params["model"]
    if not hub.store.versions(name):
        raise HttpError(404, f"no predictions of a model named {name!r} on this device")
    try:
        doc = json.loads(req.body(FEEDBACK_MAX_BYTES, "feedback"))
        results = hub.feedback(name, doc)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"feedback is not JSON: {e}") from e
    except FeedbackError as e:
        raise HttpError(400, str(e)) from e
    accepted = sum(1 for r in results if r["status"] == "accepted")
    if "items" not in doc:  # one item: its outcome is the status
        return json_response(STATUS_HTTP[results[0]["status"]], results[0])
    return json_response(200, {"accepted": accepted, "rejected": len(results) - accepted,
                               "results": results})


def quality(server: Any, req: Request) -> Response:
    hub = _hub(server)
    inst = _served(server, req).installed
    return json_response(200, hub.local_report(inst.model, inst.version, inst.variant.id,
                                               tuple(inst.manifest.labels)))


def _hub(server: Any) -> Any:
    hub = server.models.quality
    if hub is None:
        raise HttpError(404, "quality monitoring is off on this device (quality_enabled)")
    return hub


ROUTES = [
    Route("GET", "/healthz", healthz),
    Route("GET", "/metrics", metrics),
    Route("GET", "/v1/models", list_models),
    Route("GET", "/v1/models/{model}", one_model),
    Route("POST", "/v1/models/{model}/predict", predict),
    Route("POST", "/v1/models/{model}/feedback", feedback),
    Route("GET", "/v1/models/{model}/quality", quality),
    Route("POST", "/v1/admin/install", install_archive),
]
