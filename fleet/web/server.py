"""The fleet's HTTP side: dashboard (``/``), REST API (``/api/v1/…``, described at
``/openapi.json``) and Prometheus metrics (``/metrics``). Standard library only; the page is
one static HTML file with its own small SVG chart code (no CDN).

Commands (start/pause/resume/abort/rollback, tagging) go through the same functions as the
CLI, so the audit log records them the same way. Bind it to loopback or put it behind a
proxy that authenticates: it has no authentication of its own.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from edgeship.agent.errors import ConfigError, EdgeshipError, Reason
from edgeship.fleet import metrics
from edgeship.fleet.rollout import Policy
from edgeship.fleet.rollout_runner import control, load, progress, start_rollout
from edgeship.fleet.web.openapi import openapi

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
DASHBOARD = Path(__file__).with_name("dashboard.html")


class ApiError(EdgeshipError):
    """An error answer of the fleet's HTTP API: its status and a one-line message."""

    reason_code = Reason.BAD_REQUEST

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _body(handler: "_Handler") -> dict[str, Any]:
    length = int(handler.headers.get("Content-Length") or 0)
    if length > MAX_BODY_BYTES:
        raise ApiError(413, f"body over {MAX_BODY_BYTES} bytes")
    raw = handler.rfile.read(length) if length else b"{}"
    try:
        doc = json.loads(raw or b"{}")
    except ValueError as e:
        raise ApiError(400, f"body is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ApiError(400, "body must be a JSON object")
    return doc


class Api:
    """Route table → functions of (fleet server, match, query, body)."""

    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet
        self.routes: list[tuple[str, re.Pattern, Callable]] = [
            ("GET", re.compile(r"/api/v1/devices"), self.devices),
            ("POST", re.compile(r"/api/v1/devices/([^/]+)/tags"), self.tag),
            ("GET", re.compile(r"/api/v1/releases"), self.releases),
            ("GET", re.compile(r"/api/v1/rollouts"), self.rollouts),
            ("POST", re.compile(r"/api/v1/rollouts"), self.start),
            ("GET", re.compile(r"/api/v1/rollouts/([^/]+)"), self.rollout),
            ("POST", re.compile(r"/api/v1/rollouts/([^/]+)/(pause|resume|abort|rollback)"),
             self.command),
            ("GET", re.compile(r"/api/v1/telemetry/([^/]+)"), self.telemetry),
            ("GET", re.compile(r"/api/v1/audit"), self.audit),
        ]
        from edgeship.fleet.web import quality_api
        self.routes += quality_api.routes(self)

    @property
    def registry(self):
        return self.fleet.registry

    def devices(self, m, q, body):
        return [d.to_dict() for d in self.registry.devices(group=q.get("group"),
                                                           tag=q.get("tag"))]

    def tag(self, m, q, body):
        device = m.group(1)
        self.registry.tag(device, add=body.get("add", []), remove=body.get("remove", []))
        if "group" in body:
            self.registry.set_group(device, body["group"] or None)
        self.registry.audit(body.get("by", "api"), "devices.tag", None, devices=[device],
                            **{k: body.get(k) for k in ("add", "remove", "group")})
        return [d.to_dict() for d in self.registry.devices() if d.id == device][0]

    def releases(self, m, q, body):
        return [{"model": r[0], "version": r[1], "released_at": r[2], "by": r[3]}
                for r in self.registry.releases()]

    def rollouts(self, m, q, body):
        return [progress(self.registry, load(self.registry, d["id"]))
                for d in self.registry.rollouts()]

    def rollout(self, m, q, body):
        doc = progress(self.registry, load(self.registry, m.group(1)))
        doc["audit"] = self.registry.audit_log(m.group(1))
        return doc

    def start(self, m, q, body):
        try:
            policy = Policy.from_dict(body.get("policy", {}))
            version = int(body["version"])
            model = str(body["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(400, f"bad rollout request: {e}") from e
        r = start_rollout(self.registry, model=model, version=version, policy=policy,
                          actor=str(body.get("by", "api")), group=body.get("group"),
                          tag=body.get("tag"), from_version=body.get("from_version"))
        return progress(self.registry, r)

    def command(self, m, q, body):
        r = control(self.registry, m.group(1), m.group(2), str(body.get("by", "api")),
                    str(body.get("reason", "")))
        return progress(self.registry, r)

    def telemetry(self, m, q, body):
        try:
            since = float(q.get("since", self.registry.now() - 600))
            bucket = max(1.0, float(q.get("bucket_s", 5)))
        except ValueError as e:
            raise ApiError(400, f"bad query: {e}") from e
        return self.registry.version_series(m.group(1), since, bucket)

    def audit(self, m, q, body):
        return self.registry.audit_log(q.get("rollout"))

    def dispatch(self, method: str, path: str, query: dict[str, str],
                 handler: "_Handler") -> Any:
        for verb, pattern, fn in self.routes:
            match = pattern.fullmatch(path)
            if match and verb == method:
                body = _body(handler) if method == "POST" else {}
                try:
                    return fn(match, query, body)
                except ApiError:
                    raise
                except ConfigError as e:
                    raise ApiError(404 if e.key == "rollout" else 400, str(e)) from e
                except EdgeshipError as e:
                    raise ApiError(500, str(e)) from e
        raise ApiError(404, f"no route {method} {path}")


class _Handler(BaseHTTPRequestHandler):
    server: "FleetWebServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if method == "GET" and url.path in ("/", "/index.html"):
                return self._send(200, DASHBOARD.read_bytes(), "text/html; charset=utf-8")
            if method == "GET" and url.path == "/openapi.json":
                return self._json(200, openapi())
            if method == "GET" and url.path == "/metrics":
                data, ctype = metrics.render(self.server.fleet)
                return self._send(200, data, ctype)
            self._json(200, self.server.api.dispatch(method, url.path, query, self))
        except ApiError as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # the dashboard must not take the server down
            logger.exception("HTTP %s %s failed", method, url.path)
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc, default=str).encode(), "application/json")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


class FleetWebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fleet: Any, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)
        self.fleet = fleet
        self.api = Api(fleet)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

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
