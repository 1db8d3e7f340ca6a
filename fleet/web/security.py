"""Request checks of the fleet's HTTP side, pure (headers in, a verdict out):

- ``Host`` must name this server (a DNS-rebinding page reaches us under its own name);
- a mutating request must come with ``Content-Type: application/json`` (a cross-site form
  or a ``text/plain`` fetch cannot send it without a CORS preflight, which we never
  grant) and, when a browser says where it comes from (``Origin``, ``Sec-Fetch-Site``),
  from this server's own origin;
- the credential is an ``Authorization: Bearer`` header (never a cookie, so a browser
  never attaches it to a request another site makes);
- bodies are bounded, their length must be a number, and JSON must be strict (no NaN or
  Infinity, which JavaScript's ``JSON.parse`` refuses).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from edgeship.agent.errors import EdgeshipError, Reason


class RequestError(EdgeshipError):
    """A refused request: HTTP ``status`` and a one-line ``message`` for the JSON error."""

    reason_code = Reason.BAD_REQUEST

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def host_name(value: str) -> str:
    """``Host`` header or URL netloc → lower-case host without port (IPv6 unbracketed)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def default_allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Loopback names, the bound address (unless a wildcard) and the operator's names."""
    names = {"localhost", "127.0.0.1", "::1"}
    if bind_host not in ("", "0.0.0.0", "::"):
        names.add(host_name(bind_host))
    return frozenset(names | {host_name(h) for h in extra})


def check_host(headers: Mapping[str, str], allowed: frozenset[str]) -> None:
    host = headers.get("Host")
    if not host:
        raise RequestError(400, "missing Host header")
    if host_name(host) not in allowed:
        raise RequestError(403, f"Host {host_name(host)!r} is not a name of this server "
                           "(add it with --http-allowed-host)")


def check_mutation(headers: Mapping[str, str], allowed: frozenset[str]) -> None:
    """Content type and origin of a POST."""
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, "a request that changes something must be "
                           "Content-Type: application/json")
    origin = headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or not parts.netloc or host_name(parts.netloc) not in allowed:
            raise RequestError(403, f"cross-site request from Origin {origin!r} refused")
    if (headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
        raise RequestError(403, "cross-site request refused")


def bearer(headers: Mapping[str, str]) -> str:
    value = headers.get("Authorization") or ""
    scheme, _, credential = value.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise RequestError(401, "an API token is required: Authorization: Bearer <token> "
                           "(edgeship fleet token create)")
    return credential.strip()


def content_length(headers: Mapping[str, str], max_bytes: int) -> int:
    raw = headers.get("Content-Length")
    if raw is None or raw.strip() == "":
        return 0
    if not raw.strip().isdigit():
        raise RequestError(400, "Content-Length must be a non-negative integer")
    length = int(raw)
    if length > max_bytes:
        raise RequestError(413, f"body over {max_bytes} bytes")
    return length


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw or b"{}", parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"body is not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "body must be a JSON object")
    return doc


def finite(doc: Any) -> Any:
    """``doc`` with every non-finite float replaced by None (what JSON can say)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    return doc


def dumps(doc: Any) -> bytes:
    """Strict JSON (never NaN/Infinity, which a browser cannot parse)."""
    return json.dumps(finite(doc), default=str, allow_nan=False).encode()
