"""Local inference API: HTTP on 127.0.0.1 and on a Unix socket, JSON or ``.npy`` bodies.

    GET  /healthz                          liveness and the number of models served
    GET  /metrics                          Prometheus text (same numbers as telemetry)
    GET  /v1/models                        every model with its input/output signature
    GET  /v1/models/<name>                 one model
    POST /v1/completions, /v1/chat/completions   OpenAI-compatible text generation
                                           (language models; see agent.llm.http)
    POST /v1/models/<name>/predict         {"inputs": [...]} (or {"inputs": {name: [...]}})
                                           or an .npy body (Content-Type application/x-npy)
                                           → {"model","version","variant","outputs":{...}}
                                           or, with ``Accept: application/x-npy``, the
                                           first output as .npy (headers name the model)

Bad requests get a 4xx with a message, never a crash: 400 bad body/shape/dtype, 404 unknown
model or path, 408 body not sent in time, 411 no length, 413 body too large, 415 unknown
content type. Anything unexpected is a 500 and the server keeps going.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.agent.errors import EdgeshipError, InferenceInputError
from edgeship.agent.serving import ModelNotFoundError, ModelServer

logger = logging.getLogger(__name__)

NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
REQUEST_TIMEOUT_S = 30.0
MAX_HEADER_COUNT = 64


class _Handler(BaseHTTPRequestHandler):
    server: "_ApiMixin"  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S  # a client that stops sending mid-body is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("api: " + format, *args)

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # headers and body go out in two writes: without this, Nagle + delayed ACK
            # add ~40 ms to every keep-alive request
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def address_string(self) -> str:
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) and addr else "unix"

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception:  # a bug in a handler must not take the server down
            logger.exception("api: unexpected error")
            self.close_connection = True
            try:
                self._error(500, "internal error")
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        models = self.server.models
        if parts == ["healthz"]:
            self._json(200, {"status": "ok", "models": len(models.models())})
        elif parts == ["metrics"] and self.server.metrics_text is not None:
            self._send(200, "text/plain; version=0.0.4", self.server.metrics_text())
        elif parts == ["v1", "models"]:
            self._json(200, {"models": [m.describe() for m in models.models()]})
        elif len(parts) == 3 and parts[:2] == ["v1", "models"]:
            try:
                self._json(200, models.get(parts[2]).describe())
            except ModelNotFoundError as e:
                self._error(404, str(e))
        else:
            self._error(404, f"no such endpoint {self.path[:200]}")

    def do_POST(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts in (["v1", "completions"], ["v1", "chat", "completions"]):
            from edgeship.agent.llm.http import handle  # OpenAI-compatible text generation
            handle(self, chat=len(parts) == 3)
            return
        if not (len(parts) == 4 and parts[:2] == ["v1", "models"] and parts[3] == "predict"):
            self.close_connection = True
            self._error(404, f"no such endpoint {self.path[:200]}")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            raw = self._parse_inputs(body)
            outputs, loaded = self.server.models.predict(parts[2], raw, check_values=True)
        except ModelNotFoundError as e:
            self._error(404, str(e))
        except _UnsupportedType as e:
            self._error(415, str(e))
        except InferenceInputError as e:
            self._error(400, str(e))
        except EdgeshipError as e:
            self._error(500, str(e))
        else:
            self._answer(outputs, loaded)

    def _answer(self, outputs: list[np.ndarray], loaded: Any) -> None:
        inst = loaded.installed
        if NPY_TYPE in (self.headers.get("Accept") or ""):
            buf = io.BytesIO()
            np.save(buf, outputs[0], allow_pickle=False)
            self._send(200, NPY_TYPE, buf.getvalue(), {
                "X-Edgeship-Model": inst.model, "X-Edgeship-Version": str(inst.version),
                "X-Edgeship-Variant": inst.variant.id})
            return
        names = [o.name for o in inst.manifest.outputs]
        self._json(200, {"model": inst.model, "version": inst.version,
                         "variant": inst.variant.id,
                         "outputs": {n: o.tolist() for n, o in zip(names, outputs)}})

    def _read_body(self) -> bytes | None:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            self._error(411, "Content-Length required")
            return None
        try:
            length = int(length_header)
        except ValueError:
            self.close_connection = True
            self._error(400, "bad Content-Length")
            return None
        if length < 0 or length > self.server.max_request_bytes:
            self.close_connection = True  # the unread body must not be parsed as a request
            self._error(413, f"body of {length} bytes exceeds "
                             f"{self.server.max_request_bytes}")
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            self._error(400, f"body ended after {len(body)} of {length} bytes")
            return None
        return body

    def _parse_inputs(self, body: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or JSON_TYPE).split(";")[0].strip()
        if ctype == NPY_TYPE:
            try:
                return np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise InferenceInputError(f"body is not a valid .npy array: {e}") from e
        if ctype not in (JSON_TYPE, "text/json"):
            raise _UnsupportedType(f"Content-Type {ctype!r}: send {JSON_TYPE} or {NPY_TYPE}")
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InferenceInputError(f"body is not JSON: {str(e)[:200]}") from e
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise InferenceInputError('JSON body must be an object with "inputs"')
        return doc["inputs"]

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, JSON_TYPE, json.dumps(doc).encode())

    def _send(self, status: int, ctype: str, data: bytes,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": HTTPStatus(status).phrase, "message": message})


class _UnsupportedType(InferenceInputError):
    pass


class _ApiMixin:
    models: ModelServer
    max_request_bytes: int
    metrics_text: Callable[[], bytes] | None
    _thread: threading.Thread | None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever,  # type: ignore[attr-defined]
                                        name=f"edgeship-api-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()  # type: ignore[attr-defined]
        self.server_close()  # type: ignore[attr-defined]


class InferenceHTTPServer(_ApiMixin, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, host: str, port: int, models: ModelServer, max_request_bytes: int,
                 metrics_text: Callable[[], bytes] | None = None) -> None:
        self.models = models
        self.max_request_bytes = max_request_bytes
        self.metrics_text = metrics_text
        self._thread = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class InferenceUnixServer(_ApiMixin, socketserver.ThreadingUnixStreamServer):
    """The same API on a Unix socket (mode 0660: the agent's user and group only)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, path: Path, models: ModelServer, max_request_bytes: int,
                 metrics_text: Callable[[], bytes] | None = None) -> None:
        self.models = models
        self.max_request_bytes = max_request_bytes
        self.metrics_text = metrics_text
        self._thread = None
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # stale socket from a previous run
        super().__init__(str(self.path), _Handler)
        os.chmod(self.path, 0o660)

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def stop(self) -> None:
        super().stop()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
