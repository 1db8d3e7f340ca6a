"""The REST API's routes (``/api/v1/…``, described at ``/openapi.json``): each one names the
role it needs and a function of the request. Commands go through the same functions as the
CLI (``fleet.rollout_runner``), and the audit log records the API token that sent them.

New views (model quality, say) add a :class:`Route` with :meth:`Api.add` and a path in
:mod:`fleet.web.openapi`; a test checks that every documented operation refuses a request
without a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from edgeship.agent.errors import ConfigError, EdgeshipError
from edgeship.fleet.auth import ApiToken, Role, TokenStore
from edgeship.fleet.registry_reads import DeviceQuery
from edgeship.fleet.rollout import Policy
from edgeship.fleet.rollout_runner import control, load, progress, start_rollout
from edgeship.fleet.web.security import RequestError


@dataclass(frozen=True)
class Request:
    match: re.Match
    query: dict[str, str]
    body: dict[str, Any]
    token: ApiToken

    @property
    def actor(self) -> str:
        return f"token:{self.token.name}"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    role: Role
    fn: Callable[[Request], Any]


def _bool(q: dict[str, str], key: str) -> bool | None:
    value = q.get(key)
    if value in (None, ""):
        return None
    if value not in ("true", "false", "1", "0"):
        raise RequestError(400, f"{key}: true or false")
    return value in ("true", "1")


def _int(q: dict[str, str], key: str, default: int) -> int:
    try:
        return int(q.get(key, default))
    except ValueError:
        raise RequestError(400, f"{key}: an integer") from None


class Api:
    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet
        self.tokens = TokenStore(fleet.registry)
        self.routes: list[Route] = []
        R, O, A = Role.READ, Role.OPERATE, Role.ADMIN
        for method, path, role, fn in (
                ("GET", r"/api/v1/whoami", R, self.whoami),
                ("GET", r"/api/v1/summary", R, self.summary),
                ("GET", r"/api/v1/devices", R, self.devices),
                ("POST", r"/api/v1/devices/([^/]+)/tags", O, self.tag),
                ("GET", r"/api/v1/releases", R, self.releases),
                ("GET", r"/api/v1/rollouts", R, self.rollouts),
                ("POST", r"/api/v1/rollouts", O, self.start),
                ("GET", r"/api/v1/rollouts/([^/]+)", R, self.rollout),
                ("POST", r"/api/v1/rollouts/([^/]+)/(pause|resume|abort|rollback)", O,
                 self.command),
                ("GET", r"/api/v1/telemetry/([^/]+)", R, self.telemetry),
                ("GET", r"/api/v1/audit", R, self.audit),
                ("GET", r"/api/v1/tokens", A, self.list_tokens),
                ("POST", r"/api/v1/tokens/([^/]+)/revoke", A, self.revoke_token)):
            self.add(Route(method, re.compile(path), role, fn))

    def add(self, route: Route) -> None:
        self.routes.append(route)

    @property
    def registry(self):
        return self.fleet.registry

    def find(self, method: str, path: str) -> tuple[Route, re.Match]:
        allowed = []
        for route in self.routes:
            match = route.pattern.fullmatch(path)
            if match and route.method == method:
                return route, match
            if match:
                allowed.append(route.method)
        if allowed:
            raise RequestError(405, f"{method} not allowed on {path} (use {allowed[0]})")
        raise RequestError(404, f"no route {method} {path}")

    def call(self, route: Route, request: Request) -> Any:
        if not request.token.role.allows(route.role):
            raise RequestError(403, f"token {request.token.name!r} has role "
                               f"{request.token.role.value}; this needs {route.role.value}")
        try:
            return route.fn(request)
        except RequestError:  # an EdgeshipError too: keep its own status
            raise
        except ConfigError as e:
            raise RequestError(404 if e.key in ("rollout", "token") else 400, str(e)) from e
        except EdgeshipError as e:
            raise RequestError(500, str(e)) from e

    # --- reads -----------------------------------------------------------------------------

    def whoami(self, r: Request):
        return r.token.to_dict()

    def summary(self, r: Request):
        return self.registry.fleet_summary()

    def devices(self, r: Request):
        q = r.query
        query = DeviceQuery(search=q.get("q") or None, online=_bool(q, "online"),
                            profile=q.get("profile") or None, group=q.get("group") or None,
                            tag=q.get("tag") or None, failing=bool(_bool(q, "failing")),
                            sort=q.get("sort", "id"), descending=q.get("order") == "desc",
                            offset=_int(q, "offset", 0), limit=_int(q, "limit", 50))
        total, page = self.registry.device_page(query)
        return {"total": total, "offset": query.offset, "limit": query.limit,
                "items": [d.to_dict() for d in page]}

    def releases(self, r: Request):
        return [{"model": m, "version": v, "released_at": at, "by": by}
                for m, v, at, by in self.registry.releases()]

    def rollouts(self, r: Request):
        return [self._progress(doc) for doc in self.registry.rollouts()]

    def _progress(self, doc: dict[str, Any]) -> dict[str, Any]:
        """One rollout's progress; a record this release cannot read (an older one stored
        a NaN in its policy, say) is listed with why, not allowed to hide the others."""
        try:
            return progress(self.registry, load(self.registry, doc["id"]))
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            return {"id": doc.get("id"), "model": doc.get("model"), "state": doc.get("state"),
                    "from_version": doc.get("from_version"),
                    "to_version": doc.get("to_version"), "created_by": doc.get("created_by"),
                    "reason": f"unreadable rollout record: {e}", "waves": [], "moved": 0,
                    "serving": 0, "failed": 0, "devices": 0, "policy": {}, "phase": None}

    def rollout(self, r: Request):
        doc = progress(self.registry, load(self.registry, r.match.group(1)))
        doc["audit"] = self.registry.audit_log(r.match.group(1))
        return doc

    def telemetry(self, r: Request):
        try:
            since = float(r.query.get("since", self.registry.now() - 600))
            bucket = max(1.0, float(r.query.get("bucket_s", 5)))
        except ValueError as e:
            raise RequestError(400, f"bad query: {e}") from e
        if since != since or bucket != bucket or bucket == float("inf"):
            raise RequestError(400, "since and bucket_s must be finite numbers")
        return self.registry.version_series(r.match.group(1), since, bucket)

    def audit(self, r: Request):
        return self.registry.audit_log(r.query.get("rollout"))

    def list_tokens(self, r: Request):
        return [tok.to_dict() for tok in self.tokens.list()]

    # --- commands --------------------------------------------------------------------------

    def tag(self, r: Request):
        device, body = r.match.group(1), r.body
        add, remove = body.get("add", []), body.get("remove", [])
        if not all(isinstance(x, list) and all(isinstance(s, str) for s in x)
                   for x in (add, remove)):
            raise RequestError(400, "add and remove: lists of strings")
        group = body.get("group")
        if "group" in body and group is not None and not isinstance(group, str):
            raise RequestError(400, "group: a string or null")
        self.registry.tag(device, add=add, remove=remove)
        if "group" in body:
            self.registry.set_group(device, group or None)
        self.registry.audit(r.actor, "devices.tag", None, token=r.token.id, devices=[device],
                            add=add, remove=remove, group=group)
        return [d.to_dict() for d in self.registry.devices() if d.id == device][0]

    def start(self, r: Request):
        body = r.body
        try:
            policy = Policy.from_dict(body.get("policy", {}))
            version, model = body["version"], body["model"]
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(400, f"bad rollout request: {e}") from e
        from_version = body.get("from_version")
        if not isinstance(version, int) or isinstance(version, bool) or \
                not isinstance(model, str) or not (from_version is None or
                                                   isinstance(from_version, int)):
            raise RequestError(400, "model: a string; version, from_version: integers")
        rollout = start_rollout(self.registry, model=model, version=version, policy=policy,
                                actor=r.actor, group=body.get("group"), tag=body.get("tag"),
                                from_version=from_version, token=r.token.id)
        return progress(self.registry, rollout)

    def command(self, r: Request):
        rollout = control(self.registry, r.match.group(1), r.match.group(2), r.actor,
                          str(r.body.get("reason", ""))[:500], token=r.token.id)
        return progress(self.registry, rollout)

    def revoke_token(self, r: Request):
        return self.tokens.revoke(r.match.group(1), by=r.actor, by_token=r.token.id).to_dict()
