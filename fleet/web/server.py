"""The fleet's HTTP side: dashboard (``/``), REST API (``/api/v1/…``, described at
``/openapi.json``) and Prometheus metrics (``/metrics``). Standard library only; the page is
one static HTML file with its own small SVG chart code (no CDN), holding no fleet data:
it asks for an API token and reads everything through the API.

Every API call, ``/openapi.json`` and ``/metrics`` need an API token (``Authorization:
Bearer``, :mod:`fleet.auth`) of a role the route names; ``Host`` must be a name of this
server; commands must be ``application/json`` from this server's own origin
(:mod:`fleet.web.security`). Optionally HTTPS, and with ``client_ca`` a client certificate
signed by the fleet CA on top (mutual TLS). Connections are capped (503 past the cap) and
an idle one is closed after ``idle_timeout_s``.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from edgeship.fleet import metrics
from edgeship.fleet.auth import AuthError, Role
from edgeship.fleet.web import quality_api
from edgeship.fleet.web.api import Api, Request
from edgeship.fleet.web.openapi import openapi
from edgeship.fleet.web.security import (RequestError, bearer, check_host, check_mutation,
                                         content_length, default_allowed_hosts, dumps,
                                         parse_json_object)

logger = logging.getLogger(__name__)

DASHBOARD = Path(__file__).with_name("dashboard.html")
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: 44\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
         b'{"error": "too many connections, retry"}   ')


@dataclass(frozen=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 0
    allowed_hosts: tuple[str, ...] = ()  # names besides loopback and the bound address
    tls_cert: Path | None = None          # HTTPS with this certificate and key
    tls_key: Path | None = None
    client_ca: Path | None = None         # mutual TLS: client certificates from this CA
    max_connections: int = 64             # open at once; more are answered 503
    idle_timeout_s: float = 15.0          # a connection silent this long is closed
    max_body_bytes: int = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: "FleetWebServer"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.settings.idle_timeout_s  # socket timeout per read
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        try:
            check_host(self.headers, self.server.allowed_hosts)
            if method == "GET" and url.path in ("/", "/index.html"):
                return self._send(200, DASHBOARD.read_bytes(), "text/html; charset=utf-8")
            self._route(method, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()})
        except RequestError as e:
            # a refused POST's body was not read: never parse on from the middle of it
            self._json(e.status, {"error": str(e)}, close=method == "POST" or e.status == 400)
        except Exception:  # the API must not take the server down, nor leak internals
            logger.exception("HTTP %s %s failed", method, url.path)
            self._json(500, {"error": "internal error (see the fleet server's log)"})

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        api = self.server.api
        if method == "POST":
            check_mutation(self.headers, self.server.allowed_hosts)
        try:
            token = api.tokens.verify(bearer(self.headers))
        except AuthError as e:
            raise RequestError(401, str(e)) from e
        if method == "GET" and path == "/openapi.json":
            return self._json(200, openapi())
        if method == "GET" and path == "/metrics":
            data, ctype = metrics.render(self.server.fleet)
            return self._send(200, data, ctype)
        route, match = api.find(method, path)
        body = self._body() if method == "POST" else {}
        self._json(200, api.call(route, Request(match, query, body, token)))

    def _body(self) -> dict[str, Any]:
        length = content_length(self.headers, self.server.settings.max_body_bytes)
        return parse_json_object(self.rfile.read(length) if length else b"")

    def _json(self, status: int, doc: Any, close: bool = False) -> None:
        data = dumps(doc)
        if status == 200 and self.command == "GET":
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            if self.headers.get("If-None-Match") == etag:
                return self._send(304, b"", "application/json", etag=etag)
            return self._send(200, data, "application/json", etag=etag)
        extra = {"WWW-Authenticate": 'Bearer realm="edgeship"'} if status == 401 else {}
        self._send(status, data, "application/json", close=close, **extra)

    def _send(self, status: int, data: bytes, ctype: str, close: bool = False,
              etag: str | None = None, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache" if etag else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src "
                         "'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                         "frame-ancestors 'none'")
        if etag:
            self.send_header("ETag", etag)
        for name, value in headers.items():
            self.send_header(name, value)
        if close:  # a body we did not read, or one we refused: do not parse on from it
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if status != 304:
            self.wfile.write(data)


class FleetWebServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, fleet: Any, settings: WebSettings = WebSettings()) -> None:
        self.settings = settings
        self.allowed_hosts = default_allowed_hosts(settings.host, settings.allowed_hosts)
        super().__init__((settings.host, settings.port), _Handler)
        self.fleet = fleet
        self.api = Api(fleet)
        quality_api.register(self.api)  # /api/v1/quality[/<model>]
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._thread: threading.Thread | None = None
        if settings.tls_cert is not None:
            self.socket = self._tls_context().wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False)

    def _tls_context(self) -> ssl.SSLContext:
        """Handshakes happen in each connection's thread (on its first read, under the
        idle timeout), never in the accepting thread."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key))
        if self.settings.client_ca is not None:
            ctx.load_verify_locations(str(self.settings.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.settings.tls_cert is not None else "http"
        return f"{scheme}://{host}:{port}"

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                if not isinstance(request, ssl.SSLSocket):  # no handshake in this thread
                    request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("HTTP connection from %s failed", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="fleet-http",
                                        daemon=True)
        self._thread.start()
        logger.info("dashboard on %s", self.url)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["FleetWebServer", "WebSettings", "Role"]
