"""API tokens for the fleet's REST API and dashboard: ``read`` (look), ``operate`` (start and
steer rollouts, tag devices), ``admin`` (also list and revoke tokens).

A token is ``esf_<id>_<secret>``, shown once when created. The registry keeps only the
SHA-256 of the secret (the secret is 256 random bits, so a plain hash is as good as a slow
one), its role, who made it, when it expires and whether it was revoked. Checking a token
is one indexed read; a revoked or expired token is refused on its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import select

from edgeship.agent.errors import ConfigError, EdgeshipError
from edgeship.fleet import schema as t

PREFIX = "esf_"
_TOKEN_RE = re.compile(r"^esf_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
LAST_USED_EVERY_S = 60.0  # how often last_used_at is written (not on every request)


class Role(str, Enum):
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"

    def allows(self, needed: "Role") -> bool:
        order = [Role.READ, Role.OPERATE, Role.ADMIN]
        return order.index(self) >= order.index(needed)


class AuthError(EdgeshipError):
    """A request without a valid credential (HTTP 401)."""


@dataclass(frozen=True)
class ApiToken:
    id: str
    name: str
    role: Role
    created_at: float
    created_by: str | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "role": self.role.value}


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise ConfigError(f"role {text!r}: one of read, operate, admin", key="role") from None


class TokenStore:
    """Tokens in the registry (``api_tokens``)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.db = registry.db

    def create(self, name: str, role: Role, *, by: str | None = None,
               ttl_s: float | None = None) -> tuple[ApiToken, str]:
        """A new token and its text (shown once; only its hash is stored)."""
        if not name or len(name) > 64:
            raise ConfigError("token name: 1 to 64 characters", key="name")
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = self.registry.now()
        token = ApiToken(token_id, name, role, now, by,
                         None if ttl_s is None else now + ttl_s)
        with self.db.write() as conn:
            conn.execute(t.api_tokens.insert().values(
                id=token_id, name=name, role=role.value, secret_sha256=_sha256(secret),
                created_at=now, created_by=by, expires_at=token.expires_at))
        self.registry.audit(by, "token.create", None, token_id=token_id, name=name,
                            role=role.value, expires_at=token.expires_at)
        return token, f"{PREFIX}{token_id}_{secret}"

    def list(self) -> list[ApiToken]:
        c = t.api_tokens.c
        with self.db.read() as conn:
            rows = conn.execute(select(c.id, c.name, c.role, c.created_at, c.created_by,
                                       c.expires_at, c.revoked_at, c.last_used_at)
                                .order_by(c.created_at, c.id)).all()
        return [ApiToken(r[0], r[1], Role(r[2]), *r[3:]) for r in rows]

    def revoke(self, token_id: str, *, by: str | None = None,
               by_token: str | None = None) -> ApiToken:
        c = t.api_tokens.c
        with self.db.write() as conn:
            done = conn.execute(t.api_tokens.update()
                                .where(c.id == token_id, c.revoked_at.is_(None))
                                .values(revoked_at=self.registry.now())).rowcount
        token = next((x for x in self.list() if x.id == token_id), None)
        if token is None:
            raise ConfigError(f"no token {token_id!r}", key="token")
        if done:
            self.registry.audit(by, "token.revoke", None, token=by_token, token_id=token_id,
                                name=token.name)
        return token

    def verify(self, text: str) -> ApiToken:
        """The token ``text`` stands for, or AuthError saying why not."""
        match = _TOKEN_RE.match(text or "")
        if match is None:
            raise AuthError("malformed API token")
        c = t.api_tokens.c
        with self.db.read() as conn:
            row = conn.execute(select(c.id, c.name, c.role, c.created_at, c.created_by,
                                      c.expires_at, c.revoked_at, c.last_used_at,
                                      c.secret_sha256).where(c.id == match[1])).first()
        # compare even when the id is unknown, so timing does not tell which ids exist
        stored = row.secret_sha256 if row is not None else "0" * 64
        if not hmac.compare_digest(stored, _sha256(match[2])) or row is None:
            raise AuthError("unknown API token")
        token = ApiToken(row[0], row[1], Role(row[2]), *row[3:8])
        now = self.registry.now()
        if token.revoked_at is not None:
            raise AuthError(f"API token {token.id} ({token.name}) was revoked")
        if token.expires_at is not None and now >= token.expires_at:
            raise AuthError(f"API token {token.id} ({token.name}) has expired")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_EVERY_S:
            with self.db.write() as conn:
                conn.execute(t.api_tokens.update().where(c.id == token.id)
                             .values(last_used_at=now))
        return token
