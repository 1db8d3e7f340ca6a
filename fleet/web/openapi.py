"""The REST API's OpenAPI 3.1 description (served at /openapi.json)."""

from __future__ import annotations

from typing import Any


_ERROR = {"$ref": "#/components/schemas/Error"}
SECURITY_SCHEMES = {
    "token": {"type": "http", "scheme": "bearer", "bearerFormat": "esf_<id>_<secret>",
              "description": "API token from 'edgeship fleet token create --role "
                             "read|operate|admin'; read for GET, operate for rollouts and "
                             "tags, admin for tokens"},
    "fleetCA": {"type": "mutualTLS", "description": "with --http-client-ca: a client "
                "certificate signed by the fleet CA, in addition to the token"},
}


def _op(summary: str, *, params: list[dict] | None = None, body: str | None = None,
        result: str = "object", role: str | None = None) -> dict[str, Any]:
    role = role or ("operate" if body else "read")
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{result}"} if result[0].isupper()
            else {"type": result}}}},
        "400": {"description": "bad input", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}},
        "401": {"description": "no valid API token (missing, unknown, revoked, expired)",
                "content": {"application/json": {"schema": _ERROR}}},
        "403": {"description": "the token's role is too low, or a foreign Host/Origin",
                "content": {"application/json": {"schema": _ERROR}}},
        "404": {"description": "not found"}}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
        op["responses"]["415"] = {"description": "not Content-Type: application/json"}
    op["x-required-role"] = role
    return op


def _q(name: str, typ: str = "string", where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": typ}}


_ID = [_q("id", where="path")]

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "properties": {"error": {"type": "string"}},
              "required": ["error"]},
    "Device": {"type": "object", "properties": {
        "id": {"type": "string"}, "online": {"type": "boolean"},
        "last_seen": {"type": "number"}, "profile": {"type": ["string", "null"]},
        "agent_version": {"type": ["string", "null"]}, "arch": {"type": ["string", "null"]},
        "group": {"type": ["string", "null"]}, "tags": {"type": "array",
                                                         "items": {"type": "string"}},
        "models": {"description": "what the device reports it runs"},
        "desired": {"type": "object", "additionalProperties": {"type": "integer"}},
        "last_event": {"type": ["string", "null"]},
        "last_failure": {"type": ["string", "null"],
                         "description": "reason of the last failed or rejected event"},
        "last_failure_detail": {"type": ["string", "null"], "description":
                                "what the device said about it, e.g. 47.0 ms > 20.0 ms "
                                "(the release's budget)"},
        "cpu_percent": {"type": ["number", "null"]},
        "memory_percent": {"type": ["number", "null"]},
        "temperature_c": {"type": ["number", "null"]}}},
    "DevicePage": {"type": "object", "properties": {
        "total": {"type": "integer"}, "offset": {"type": "integer"},
        "limit": {"type": "integer"},
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}}}},
    "Rollout": {"type": "object", "properties": {
        "id": {"type": "string"}, "model": {"type": "string"},
        "from_version": {"type": ["integer", "null"]}, "to_version": {"type": "integer"},
        "state": {"enum": ["running", "paused", "halted", "rolling_back", "rolled_back",
                           "aborted", "done"]},
        "reason": {"type": "string"}, "wave": {"type": "integer"},
        "waves": {"type": "array", "items": {"$ref": "#/components/schemas/Wave"}},
        "phase": {"enum": ["staging", "committed", None],
                  "description": "all-or-none: staging (devices hold the version, "
                                 "nothing switched) or committed; null otherwise"},
        "committed_at": {"type": ["number", "null"]},
        "policy": {"type": "object"}, "created_by": {"type": "string"},
        "moved": {"type": "integer", "description": "devices told to run the new version"},
        "serving": {"type": "integer", "description": "devices that report serving it"}}},
    "Wave": {"type": "object", "properties": {
        "wave": {"type": "integer"}, "devices": {"type": "integer"},
        "sent": {"type": "integer"}, "held": {"type": "integer",
                                              "description": "all-or-none: staged, waiting"},
        "serving": {"type": "integer"}, "failed": {"type": "integer"},
        "status": {"enum": ["pending", "active", "passed", "failed", "stopped"]},
        "verdict": {"type": ["object", "null"]},
        "waiting": {"type": ["string", "null"], "description": "what the active wave "
                    "waits on, naming the devices"},
        "pending_devices": {"type": "array", "items": {"type": "string"}},
        "failed_devices": {"type": "object", "additionalProperties": {"type": "string"}},
        "offline_devices": {"type": "array", "items": {"type": "object"},
                            "description": "device, last_seen, deadline"}}},
    "RolloutStart": {"type": "object", "required": ["model", "version"], "properties": {
        "model": {"type": "string"}, "version": {"type": "integer"},
        "group": {"type": "string"}, "tag": {"type": "string"},
        "from_version": {"type": "integer"}, "by": {"type": "string"},
        "policy": {"type": "object", "description": "fleet.rollout.Policy fields"}}},
    "Command": {"type": "object", "properties": {"reason": {"type": "string"},
                                                 "by": {"type": "string"}}},
    "Tagging": {"type": "object", "properties": {
        "add": {"type": "array", "items": {"type": "string"}},
        "remove": {"type": "array", "items": {"type": "string"}},
        "group": {"type": ["string", "null"]}, "by": {"type": "string"}}},
}


def openapi() -> dict[str, Any]:
    paths = {
        "/api/v1/whoami": {"get": _op("The token this request carries (name, role)")},
        "/api/v1/summary": {"get": _op("Device counts: online, per profile, per version "
                                       "running, failing")},
        "/api/v1/devices": {"get": _op(
            "One page of devices with inventory, tags, group, what they run, their desired "
            "state, last seen, CPU/memory/temperature and last failure (filtered, sorted "
            "and paged on the server; ETag / If-None-Match)",
            params=[_q("q"), _q("online", "boolean"), _q("profile"), _q("group"), _q("tag"),
                    _q("failing", "boolean"), _q("sort"), _q("order"),
                    _q("offset", "integer"), _q("limit", "integer")], result="DevicePage")},
        "/api/v1/tokens": {"get": _op("API tokens (never their secrets)", result="array",
                                      role="admin")},
        "/api/v1/tokens/{id}/revoke": {"post": _op("Revoke a token", params=_ID,
                                                   body="Command", role="admin")},
        "/api/v1/devices/{id}/tags": {"post": _op("Tag a device / set its group",
                                                  params=_ID, body="Tagging",
                                                  result="Device")},
        "/api/v1/releases": {"get": _op("Released model versions", result="array")},
        "/api/v1/rollouts": {
            "get": _op("Rollouts with progress by wave", result="array"),
            "post": _op("Start a rollout", body="RolloutStart", result="Rollout")},
        "/api/v1/rollouts/{id}": {"get": _op("One rollout, by wave, with its audit log",
                                             params=_ID, result="Rollout")},
        "/api/v1/telemetry/{model}": {"get": _op(
            "Requests, errors and p50 latency per version over time",
            params=[_q("model", where="path"), _q("since", "number"),
                    _q("bucket_s", "number")], result="array")},
        "/api/v1/audit": {"get": _op("Audit log", params=[_q("rollout")], result="array")},
    }
    from edgeship.fleet.web.quality_api import OPENAPI_PATHS
    for path, (summary, params) in OPENAPI_PATHS.items():
        paths[path] = {"get": _op(summary, params=[_q(*p) for p in params])}
    for cmd in ("pause", "resume", "abort", "rollback"):
        paths[f"/api/v1/rollouts/{{id}}/{cmd}"] = {"post": _op(
            f"{cmd.capitalize()} a rollout", params=_ID, body="Command", result="Rollout")}
    return {"openapi": "3.1.0",
            "info": {"title": "edgeship fleet API", "version": "1"},
            "security": [{"token": []}, {"token": [], "fleetCA": []}],
            "paths": paths, "components": {"schemas": SCHEMAS,
                                           "securitySchemes": SECURITY_SCHEMES}}
