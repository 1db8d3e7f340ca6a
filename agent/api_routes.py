"""The local API's routing pieces, apart from the server (``agent.api``) so the route
modules (``agent.api_v1``, ``agent.api_v2``) and the server import them without a cycle:
a request as a handler sees it, the response it returns, routes and their matching."""

from __future__ import annotations

import functools
import importlib
import json
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

import numpy as np

from edgeship.agent.errors import EdgeshipError, Reason

JSON_TYPE = "application/json"


class HttpError(EdgeshipError):
    """An HTTP error answer: its status and a one-line message (handlers that catch
    EdgeshipError let this one through)."""

    reason_code = Reason.BAD_REQUEST

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def v1_error(status: int, message: str) -> bytes:
    return json.dumps({"error": HTTPStatus(status).phrase, "message": message}).encode()


def v2_error(status: int, message: str) -> bytes:
    """The error body of the Open Inference Protocol routes (``agent.api_v2``)."""
    return json.dumps({"error": message}).encode()


@dataclass
class Response:
    status: int
    content_type: str
    chunks: list[bytes | memoryview]
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, doc: Any) -> Response:
    return Response(status, JSON_TYPE, [json.dumps(doc).encode()])


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # "/v2/models/{model}/infer": each {name} matches one path segment
    handler: Callable[[Any, Any], Response | None]
    errors: Callable[[int, str], bytes] = v1_error  # the error body of this API
    #: True: ``handler(server, http_handler)`` gets the connection's handler and writes
    #: its own answer (streaming, e.g. server-sent events); it may use ``_read_body``,
    #: ``_json`` and ``_error`` below
    raw: bool = False

    @functools.cached_property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))


def lazy_route(module: str, method: str, pattern: str,
               errors: Callable[[int, str], bytes] = v1_error, raw: bool = False) -> Route:
    """The route ``method pattern`` of ``module.ROUTES``, whose module is imported by the
    route's first request: an agent loads the code of an API only once it is called."""
    def handler(server: Any, request: Any) -> Response | None:
        return _route_in(module, method, pattern).handler(server, request)
    return Route(method, pattern, handler, errors, raw)


@functools.cache
def _route_in(module: str, method: str, pattern: str) -> Route:
    routes: list[Route] = importlib.import_module(module).ROUTES
    return next(r for r in routes if (r.method, r.pattern) == (method, pattern))


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self._by_length: dict[int, list[Route]] = {}
        for route in routes:
            self._by_length.setdefault(len(route.segments), []).append(route)

    def match(self, method: str, parts: list[str]) -> tuple[Route | None, dict[str, str],
                                                             bool]:
        """(route, path parameters, whether the path exists for another method)."""
        other_method = False
        for route in self._by_length.get(len(parts), ()):
            params = _bind(route.segments, parts)
            if params is None:
                continue
            if route.method == method:
                return route, params, False
            other_method = True
        return None, {}, other_method


def _bind(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    params = {}
    for want, got in zip(pattern, parts):
        if want.startswith("{"):
            if not got:
                return None
            params[want[1:-1]] = urllib.parse.unquote(got)
        elif want != got:
            return None
    return params


class Request:
    """One request as a handler sees it; the body is read only through :meth:`body`."""

    def __init__(self, handler: Any, params: dict[str, str], query: str) -> None:
        """``handler``: the connection's ``BaseHTTPRequestHandler`` (``agent.api``)."""
        self._handler = handler
        self.headers = handler.headers
        self.params = params
        self.query = query
        self.body_read = False
        self.drain_bytes = 0

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def content_length(self) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            raise HttpError(411, "Content-Length required")
        if not value.strip().isdigit() or len(value) > 18:
            raise HttpError(400, f"bad Content-Length {value[:30]!r}")
        return int(value)

    def body(self, max_bytes: int, what: str = "body") -> bytes:
        """The body, or HttpError 413 (nothing read) when it is longer than ``max_bytes``."""
        length = self._admit(max_bytes, what)
        data = self._handler.rfile.read(length)
        self._check_read(len(data), length)
        return data

    def body_aligned(self, max_bytes: int, align_at: int) -> memoryview:
        """:meth:`body` read into a buffer where offset ``align_at`` of the body falls on
        a 64-byte boundary: binary tensor data starting there is viewed in place, not
        copied to align it."""
        length = self._admit(max_bytes, "body")
        data = aligned_buffer(length, align_at)
        self._check_read(self._handler.rfile.readinto(data), length)
        return data

    def _admit(self, max_bytes: int, what: str) -> int:
        """The body's length once it is within ``max_bytes`` (else 413, nothing read)."""
        length = self.content_length()
        self.body_read = True
        h = self._handler
        if length > max_bytes:
            if not h.expect_continue:
                self.drain_bytes = length  # read and dropped after the 413 is written
            raise HttpError(413, f"{what} of {length} bytes exceeds the {max_bytes}-byte cap "
                                 "of this endpoint (send binary data, or raise "
                                 "max_request_bytes in the agent's config)")
        if h.expect_continue:
            h.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            h.expect_continue = False
        return length

    def _check_read(self, got: int, length: int) -> None:
        if got != length:
            self._handler.close_connection = True
            raise HttpError(400, f"body ended after {got} of {length} bytes")


def aligned_buffer(length: int, align_at: int, alignment: int = 64) -> memoryview:
    """``length`` writable bytes whose offset ``align_at`` is ``alignment``-aligned."""
    room = np.empty(length + alignment, np.uint8)
    start = -(room.ctypes.data + align_at) % alignment
    return room.data[start:start + length]
