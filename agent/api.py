"""Local inference API: HTTP on 127.0.0.1 and on a Unix socket, one route table.

The routes live next to this module: ``agent.api_v1`` (``/healthz``, ``/metrics``, the
edgeship ``/v1`` API) and ``agent.api_v2`` (the Open Inference Protocol, KServe v2). A route
is a method, a path pattern with ``{name}`` segments and a handler ``(server, request) ->
Response``; :func:`default_routes` lists them, and another module adds its own by appending
to that list.

Bounds (``agent.api_limits.ApiLimits``): each listener serves at most ``max_connections``
connections at once, one thread each; past that a connection gets a 503 (written and
drained by one small thread, so the client reads it) while the other listener (the Unix
socket) keeps serving. A kept-alive connection idle for ``idle_timeout_s`` is closed, and
each read of a request may take ``request_timeout_s``. A body is read only when its handler
asks for it with a cap (derived from the model's input size); a larger ``Content-Length`` is
answered 413 before anything is read (with ``Expect: 100-continue`` the client never sends
it; otherwise up to ``drain_max_bytes`` are read and dropped so the 413 reaches the client
instead of a reset).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable

from edgeship.agent.api_limits import ApiLimits
from edgeship.agent.api_routes import (JSON_TYPE, HttpError, Request, Response, Route, Router,
                                       json_response, lazy_route, v1_error, v2_error)
from edgeship.agent.api_reject import Rejector, busy_response
from edgeship.agent.serving import ModelServer

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30.0
_SMALL_WRITE = 64 * 1024
_MAX_IOV = 512  # buffers per sendmsg (Linux allows 1024)


def default_routes() -> list[Route]:
    from edgeship.agent import api_v1
    return api_v1.ROUTES + lazy_routes()


def lazy_routes() -> list[Route]:
    """The routes of ``agent.api_v2`` (Open Inference Protocol) and ``agent.llm.http``
    (OpenAI-compatible text generation), each module imported by its first request."""
    v2 = "edgeship.agent.api_v2"
    routes = [lazy_route(v2, "GET", p, v2_error) for p in ("/v2/health/live",
                                                          "/v2/health/ready", "/v2")]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [lazy_route(v2, method, base + tail, v2_error)
                   for method, tail in (("GET", ""), ("GET", "/ready"), ("POST", "/infer"))]
    llm = "edgeship.agent.llm.http"
    return routes + [lazy_route(llm, "POST", p, raw=True)
                     for p in ("/v1/completions", "/v1/chat/completions")]


class _Handler(BaseHTTPRequestHandler):
    server: "_ApiMixin"  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    timeout = None  # set per phase: idle_timeout_s, then request_timeout_s

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("api: " + format, *args)

    def setup(self) -> None:
        super().setup()
        self.expect_continue = False
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # headers and body go out in two writes: without this, Nagle + delayed ACK
            # add ~40 ms to every keep-alive request
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def address_string(self) -> str:
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) and addr else "unix"

    def handle_expect_100(self) -> bool:
        self.expect_continue = True  # answered once the handler knows the body's cap
        return True

    def handle_one_request(self) -> None:
        limits = self.server.limits
        try:
            self.connection.settimeout(limits.idle_timeout_s)
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            self.connection.settimeout(limits.request_timeout_s)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            self.expect_continue = False
            if not self.parse_request():
                return
            self._dispatch()
            self.wfile.flush()
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception:  # a bug in a handler must not take the server down
            logger.exception("api: unexpected error")
            self.close_connection = True

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        route, params, elsewhere = self.server.router.match(self.command, parts)
        if route is None:
            errors = _errors_for(parts)
            status = 405 if elsewhere else 404
            self.close_connection = True  # a body we did not read must not become a request
            self._write(Response(status, JSON_TYPE, [errors(
                status, f"no such endpoint {self.command} {path[:200]}")]))
            return
        if route.raw:
            route.handler(self.server, self)
            return
        req = Request(self, params, query)
        try:
            resp = route.handler(self.server, req)
        except HttpError as e:
            resp = Response(e.status, JSON_TYPE, [route.errors(e.status, str(e))])
        except Exception:
            logger.exception("api: unexpected error in %s %s", self.command, route.pattern)
            resp = Response(500, JSON_TYPE, [route.errors(500, "internal error")])
        assert resp is not None  # only raw routes (above) answer by themselves
        if not req.body_read and self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # unread body: this connection is done
        if req.drain_bytes or resp.status == 413:
            self.close_connection = True
        self._write(resp)
        if req.drain_bytes:
            self._drain(req.drain_bytes)

    def _write(self, resp: Response) -> None:
        size = sum(len(c) for c in resp.chunks)
        lines = [f"HTTP/1.1 {resp.status} {HTTPStatus(resp.status).phrase}",
                 f"Content-Type: {resp.content_type}", f"Content-Length: {size}"]
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if logger.isEnabledFor(logging.DEBUG):
            self.log_request(resp.status, size)
        if size <= _SMALL_WRITE:
            self.wfile.write(head + b"".join(resp.chunks))
            return
        send_all(self.connection, [head, *resp.chunks])

    # --- for raw routes -----------------------------------------------------------------

    def _read_body(self, max_bytes: int | None = None) -> bytes | None:
        """The body within ``max_bytes`` (default: the configured cap, else the fallback
        cap), or None once an error has been answered."""
        limits = self.server.limits
        cap = max_bytes or limits.max_request_bytes or limits.fallback_body_bytes
        req = Request(self, {}, "")
        try:
            return req.body(cap)
        except HttpError as e:
            self.close_connection = True
            self._error(e.status, str(e))
            if req.drain_bytes:
                self._drain(req.drain_bytes)
            return None

    def _json(self, status: int, doc: Any) -> None:
        self._write(json_response(status, doc))

    def _error(self, status: int, message: str) -> None:
        self._write(Response(status, JSON_TYPE, [v1_error(status, message)]))

    def _drain(self, length: int) -> None:
        """Read and drop an oversized body (bounded) so the client gets to read the 413."""
        limits = self.server.limits
        left = min(length, limits.drain_max_bytes)
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass


def send_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Write ``buffers`` in order with as few system calls as the socket takes (one
    ``sendmsg`` gathers them all; the tensors are sent from their own memory)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:_MAX_IOV])
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def _errors_for(parts: list[str]) -> Callable[[int, str], bytes]:
    return v2_error if parts and parts[0] == "v2" else v1_error


class _ApiMixin:
    """Connection-capped serving: one thread per connection up to the cap, a 503 past it."""

    models: ModelServer
    limits: ApiLimits
    router: Router
    metrics_text: Callable[[], bytes] | None
    #: set by the agent (``agent.local_api``): extra /healthz fields; the install hand-over
    health_info: Callable[[], dict[str, Any]] | None
    install_archive: Callable[[Path], dict[str, Any]] | None
    _thread: threading.Thread | None
    request_queue_size = 128

    def _init_api(self, models: ModelServer, limits: ApiLimits,
                  metrics_text: Callable[[], bytes] | None,
                  routes: list[Route] | None) -> None:
        self.models = models
        self.limits = limits
        self.metrics_text = metrics_text
        self.health_info = None
        self.install_archive = None
        self.router = Router(routes if routes is not None else default_routes())
        self._thread = None
        self._active = 0
        self._active_lock = threading.Lock()
        self._rejector = Rejector(f"edgeship-api-{type(self).__name__}",
                                   busy_response(limits.max_connections))
        self.grpc_info: dict[str, Any] = {}

    @property
    def active_connections(self) -> int:
        return self._active

    @property
    def rejected_connections(self) -> int:
        return self._rejector.rejected

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            over = self._active >= self.limits.max_connections
            if not over:
                self._active += 1
        if over:
            self._rejector.reject(request)
            return
        threading.Thread(target=self._serve_connection, args=(request, client_address),
                         name="edgeship-api-conn", daemon=True).start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]
            with self._active_lock:
                self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("api: connection error", exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever,  # type: ignore[attr-defined]
                                        name=f"edgeship-api-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()  # type: ignore[attr-defined]
        self.server_close()  # type: ignore[attr-defined]
        self._rejector.stop()


def _limits(max_request_bytes: int, limits: ApiLimits | None) -> ApiLimits:
    if limits is not None:
        return limits
    return ApiLimits(max_request_bytes=max_request_bytes)


class InferenceHTTPServer(_ApiMixin, HTTPServer):
    def __init__(self, host: str, port: int, models: ModelServer, max_request_bytes: int = 0,
                 metrics_text: Callable[[], bytes] | None = None, *,
                 limits: ApiLimits | None = None, routes: list[Route] | None = None) -> None:
        """``max_request_bytes`` > 0: one body cap for every model; 0: derived per model
        (``limits`` given: it wins)."""
        self._init_api(models, _limits(max_request_bytes, limits), metrics_text, routes)
        try:
            super().__init__((host, port), _Handler)
        except OSError:
            self._rejector.stop()
            raise

    def server_bind(self) -> None:
        """HTTPServer's, without its reverse DNS lookup of the address (``getfqdn``: a
        resolver round trip at start and the idna codec kept in memory, for a name that
        nothing here reads)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"


class InferenceUnixServer(_ApiMixin, socketserver.UnixStreamServer):
    """The same API on a Unix socket (mode 0660: the agent's user and group only)."""

    def __init__(self, path: Path, models: ModelServer, max_request_bytes: int = 0,
                 metrics_text: Callable[[], bytes] | None = None, *,
                 limits: ApiLimits | None = None, routes: list[Route] | None = None) -> None:
        self._init_api(models, _limits(max_request_bytes, limits), metrics_text, routes)
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
