"""A small Python client for the agent's local API (HTTP or Unix socket), stdlib only.

    from edgeship.agent.client import AgentClient
    with AgentClient("unix:///var/lib/edgeship/api.sock") as c:   # or "http://127.0.0.1:8470"
        c.models()                        # signatures
        y = c.predict("digits", x)        # numpy in, numpy out (.npy both ways)

Errors from the agent raise :class:`ApiError` with the HTTP status and the agent's message.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import urllib.parse
from typing import Any, Callable

import numpy as np

from edgeship.agent.errors import EdgeshipError, Reason

NPY_TYPE = "application/x-npy"


class ApiError(EdgeshipError):
    reason_code = Reason.BAD_REQUEST

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """One keep-alive connection; not thread-safe (make one client per thread)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        parsed = urllib.parse.urlparse(url)
        self._factory: Callable[[], http.client.HTTPConnection]
        if parsed.scheme == "unix":
            self._factory = lambda: _UnixConnection(parsed.path, timeout_s)
        elif parsed.scheme == "http" and parsed.hostname:
            host, port = parsed.hostname, parsed.port or 80
            self._factory = lambda: http.client.HTTPConnection(host, port, timeout=timeout_s)
        else:
            raise ValueError(f"bad agent URL {url!r}: use http://host:port or unix:///path")
        self.url = url
        self._conn: http.client.HTTPConnection | None = None

    # --- API --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{urllib.parse.quote(name)}")

    def predict(self, name: str, x: np.ndarray) -> np.ndarray:
        """Send one array as .npy and get the first output back as an array."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
        status, ctype, body = self._request(
            "POST", f"/v1/models/{urllib.parse.quote(name)}/predict", buf.getvalue(),
            {"Content-Type": NPY_TYPE, "Accept": NPY_TYPE})
        if status != 200:
            raise ApiError(status, _message(body))
        return np.load(io.BytesIO(body), allow_pickle=False)

    def predict_json(self, name: str, inputs: Any) -> dict[str, Any]:
        """Send ``{"inputs": ...}`` as JSON; return the agent's JSON answer."""
        if isinstance(inputs, np.ndarray):
            inputs = inputs.tolist()
        return self._json("POST", f"/v1/models/{urllib.parse.quote(name)}/predict",
                          json.dumps({"inputs": inputs}).encode())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ----------------------------------------------------------------------

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, _, data = self._request(method, path, body, headers)
        if status != 200:
            raise ApiError(status, _message(data))
        return json.loads(data)

    def _request(self, method: str, path: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, str, bytes]:
        for attempt in (0, 1):  # one retry when a kept-alive connection went stale
            if self._conn is None:
                self._conn = self._factory()
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected,
                    http.client.CannotSendRequest, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp.status, resp.getheader("Content-Type", ""), data
        raise AssertionError("unreachable")


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", body[:200]))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
