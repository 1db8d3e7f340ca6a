"""Local inference API: HTTP on 127.0.0.1, JSON or ``.npy`` bodies.

    GET  /healthz                          liveness and the number of models served
    GET  /v1/models                        every model with its input/output signature
    GET  /v1/models/<name>                 one model
    POST /v1/models/<name>/predict         {"inputs": [...]} or an .npy body
                                           → {"model","version","variant","outputs":{...}}
Bad requests get a 4xx with a message, never a crash.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from agent.errors import EdgeshipError, InferenceInputError
from agent.serving import ModelNotFoundError, ModelServer

logger = logging.getLogger(__name__)

NPY_TYPE = "application/x-npy"


class _Handler(BaseHTTPRequestHandler):
    server: "InferenceHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("api: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["healthz"]:
            self._json(200, {"status": "ok", "models": len(self.server.models.models())})
        elif parts == ["v1", "models"]:
            self._json(200, {"models": [m.describe() for m in self.server.models.models()]})
        elif len(parts) == 3 and parts[:2] == ["v1", "models"]:
            try:
                self._json(200, self.server.models.get(parts[2]).describe())
            except ModelNotFoundError as e:
                self._error(404, str(e))
        else:
            self._error(404, f"no such endpoint {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        if not (len(parts) == 4 and parts[:2] == ["v1", "models"] and parts[3] == "predict"):
            self._error(404, f"no such endpoint {self.path}")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            raw = self._parse_inputs(body)
            outputs, loaded = self.server.models.predict(parts[2], raw)
        except ModelNotFoundError as e:
            self._error(404, str(e))
        except InferenceInputError as e:
            self._error(400, str(e))
        except EdgeshipError as e:
            self._error(500, str(e))
        else:
            names = [o.name for o in loaded.installed.manifest.outputs]
            self._json(200, {"model": loaded.installed.model,
                             "version": loaded.installed.version,
                             "variant": loaded.installed.variant.id,
                             "outputs": {n: o.tolist() for n, o in zip(names, outputs)}})

    def _read_body(self) -> bytes | None:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._error(411, "Content-Length required")
            return None
        try:
            length = int(length_header)
        except ValueError:
            self._error(400, "bad Content-Length")
            return None
        if length < 0 or length > self.server.max_request_bytes:
            self.close_connection = True
            self._error(413, f"body of {length} bytes exceeds "
                             f"{self.server.max_request_bytes}")
            return None
        return self.rfile.read(length)

    def _parse_inputs(self, body: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0]
        if ctype == NPY_TYPE:
            try:
                return np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise InferenceInputError(f"body is not a valid .npy array: {e}") from e
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InferenceInputError(f"body is not JSON: {e}") from e
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise InferenceInputError('JSON body must be an object with "inputs"')
        return doc["inputs"]

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": HTTPStatus(status).phrase, "message": message})


class InferenceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, models: ModelServer,
                 max_request_bytes: int) -> None:
        self.models = models
        self.max_request_bytes = max_request_bytes
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="edgeship-api",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
