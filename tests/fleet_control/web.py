"""The fleet's HTTP side over a real registry, without a broker: what the web tests need."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from edgeship.fleet.auth import Role, TokenStore
from edgeship.fleet.registry import Registry
from edgeship.fleet.server import FleetStats
from edgeship.fleet.web.server import FleetWebServer, WebSettings


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body, parse_constant=lambda c: (_ for _ in ()).throw(
            ValueError(f"{c} in a response")))


@dataclass
class WebFleet:
    registry: Registry
    server: FleetWebServer
    tokens: dict[str, str] = field(default_factory=dict)  # role -> token text

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def call(self, method: str, path: str, *, token: str | None = None,
             body: Any = None, headers: dict[str, str] | None = None,
             context: ssl.SSLContext | None = None) -> Reply:
        hdrs = {"Host": f"127.0.0.1:{self.port}"}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        hdrs = {k: v for k, v in hdrs.items() if v is not None}  # None: leave it out
        if context is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                               context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                         resp.read())
        finally:
            conn.close()


def start_web(db, settings: WebSettings = WebSettings(), clock=None) -> WebFleet:
    registry = Registry(db, clock=clock) if clock else Registry(db)
    fleet = SimpleNamespace(registry=registry, stats=FleetStats())
    server = FleetWebServer(fleet, settings)
    server.start()
    store = TokenStore(registry)
    tokens = {role.value: store.create(f"{role.value}-token", role, by="test")[1]
              for role in Role}
    return WebFleet(registry, server, tokens)


def stop_web(web: WebFleet) -> None:
    web.server.stop()
    web.registry.close()
