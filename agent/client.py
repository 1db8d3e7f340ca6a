"""A small Python client for the agent's local API (HTTP or Unix socket), stdlib only.

    from edgeship.agent.client import AgentClient
    with AgentClient("unix:///var/lib/edgeship/api.sock") as c:   # or "http://127.0.0.1:8470"
        c.models()                        # signatures
        y = c.predict("digits", x)        # numpy in, first output out (.npy both ways)
        out = c.predict_all("vad", {"x": x, "h": h, "sr": np.int64(16000)})  # .npz both ways
        h = out["h_out"]                  # every output by name (a stateful model: pass it back)

Errors from the agent raise :class:`ApiError` with the HTTP status and the agent's message.
Bodies over 1 MiB are sent with ``Expect: 100-continue``: a body over the model's cap is
answered 413 before it is sent.

To be sure the answer comes from the agent and not from another local process that took
its TCP port first, use the Unix socket: only the agent's user and group can reach it.
"""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import time
import urllib.parse
from typing import Any, Callable

import numpy as np

from edgeship.agent.errors import EdgeshipError, Reason

NPY_TYPE = "application/x-npy"
NPZ_TYPE = "application/x-npz"
EXPECT_CONTINUE_BYTES = 1 << 20
CONTINUE_WAIT_S = 1.0  # as curl: send the body anyway if the server says nothing by then


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


    def install_archive(self, path: str) -> dict[str, Any]:
        """Hand a signed release archive to the agent (its Unix socket only)."""
        return self._json("POST", "/v1/admin/install",
                          json.dumps({"archive": str(path)}).encode())
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

    def predict_all(self, name: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Send every input by name (.npz) and get every output back by name."""
        buf = io.BytesIO()
        named: dict[str, Any] = {k: np.asarray(v) for k, v in inputs.items()}
        np.savez(buf, **named)
        status, _, body = self._request(
            "POST", f"/v1/models/{urllib.parse.quote(name)}/predict", buf.getvalue(),
            {"Content-Type": NPZ_TYPE, "Accept": NPZ_TYPE})
        if status != 200:
            raise ApiError(status, _message(body))
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}

    def predict_json(self, name: str, inputs: Any) -> dict[str, Any]:
        """Send ``{"inputs": ...}`` as JSON; return the agent's JSON answer."""
        if isinstance(inputs, np.ndarray):
            inputs = inputs.tolist()
        return self._json("POST", f"/v1/models/{urllib.parse.quote(name)}/predict",
                          json.dumps({"inputs": inputs}).encode())

    def feedback(self, name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Post true labels or values for earlier predictions by their ids (one batch of
        at most 10,000 items); the answer counts accepted and rejected items and gives
        each item's outcome."""
        status, _, data = self._request(
            "POST", f"/v1/models/{urllib.parse.quote(name)}/feedback",
            json.dumps({"items": items}).encode(), {"Content-Type": "application/json"})
        if status != 200:
            raise ApiError(status, _message(data))
        return json.loads(data)

    def quality(self, name: str) -> dict[str, Any]:
        """Labelled metrics per version, drift per signal, the label-free estimate."""
        return self._json("GET", f"/v1/models/{urllib.parse.quote(name)}/quality")

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
                resp = self._send(self._conn, method, path, body, headers)
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


    @staticmethod
    def _send(conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | None, headers: dict[str, str]) -> http.client.HTTPResponse:
        if body is None or len(body) < EXPECT_CONTINUE_BYTES:
            conn.request(method, path, body=body, headers=headers)
            return conn.getresponse()
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        if _go_ahead(conn.sock):
            conn.send(body)
        return conn.getresponse()


def _go_ahead(sock: socket.socket) -> bool:
    """After headers with ``Expect: 100-continue``: True to send the body (a 100, or no
    answer within CONTINUE_WAIT_S); False when a final answer (e.g. 413) came instead.
    Only peeks: ``getresponse`` skips the interim 100 itself."""
    deadline = time.monotonic() + CONTINUE_WAIT_S
    head = b""
    while len(head) < 12:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return True
        peeked = sock.recv(12, socket.MSG_PEEK)
        if not peeked:
            return False  # closed: getresponse reports it
        if peeked == head:
            time.sleep(0.001)  # the rest of the status line is on its way
        head = peeked
    return head.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100"))


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", body[:200]))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


def live_status(cfg: Any) -> dict[str, Any] | None:
    """The running agent of config ``cfg`` (its Unix socket, else its TCP port): URL,
    /healthz and what it serves; None when nothing answers."""
    if cfg.api_socket_path and cfg.api_socket_path.exists():
        url = f"unix://{cfg.api_socket_path}"
    elif cfg.api_enabled:
        url = f"http://{cfg.api_host}:{cfg.api_port}"
    else:
        return None
    try:
        with AgentClient(url, timeout_s=2.0) as c:
            return {"url": url, "health": c.health(),
                    "serving": {m["model"]: m["version"] for m in c.models()}}
    except (OSError, ValueError):
        return None
