"""``edgeship fleet token create|ls|revoke``: API tokens for the REST API and dashboard
(:mod:`fleet.auth`). They work on the registry directly, like ``rollout``: whoever can
open the registry (a file path or a ``postgresql://`` URL) administers its tokens."""

from __future__ import annotations

import argparse
import time

from edgeship.fleet.auth import Role, TokenStore, parse_role
from edgeship.fleet.cli_base import EXIT_OK, _command
from edgeship.fleet.cli_rollout import _actor, _print_json, _table, open_registry


def _when(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


@_command
def cmd_create(args: argparse.Namespace) -> int:
    role = parse_role(args.role)
    registry = open_registry(args.db)
    try:
        ttl = None if args.expires_days is None else args.expires_days * 86_400
        token, text = TokenStore(registry).create(args.name, role, by=_actor(args),
                                                  ttl_s=ttl)
    finally:
        registry.close()
    if args.json:
        _print_json({**token.to_dict(), "token": text})
    else:
        print(f"token {token.id} ({token.name}, role {role.value}"
              f"{', expires ' + _when(token.expires_at) if token.expires_at else ''}):")
        print(text)
        print("shown once: only its hash is stored. Send it as 'Authorization: Bearer "
              "<token>'; the dashboard asks for it.")
    return EXIT_OK


@_command
def cmd_ls(args: argparse.Namespace) -> int:
    registry = open_registry(args.db)
    try:
        tokens = TokenStore(registry).list()
    finally:
        registry.close()
    if args.json:
        _print_json([tok.to_dict() for tok in tokens])
        return EXIT_OK
    _table(f"{len(tokens)} token(s)", ["id", "name", "role", "created", "by", "expires",
                                       "last used", "revoked"],
           [[tok.id, tok.name, tok.role.value, _when(tok.created_at), tok.created_by or "",
             _when(tok.expires_at), _when(tok.last_used_at), _when(tok.revoked_at)]
            for tok in tokens])
    return EXIT_OK


@_command
def cmd_revoke(args: argparse.Namespace) -> int:
    registry = open_registry(args.db)
    try:
        token = TokenStore(registry).revoke(args.id, by=_actor(args))
    finally:
        registry.close()
    if args.json:
        _print_json(token.to_dict())
    else:
        print(f"token {token.id} ({token.name}) revoked: refused from its next request")
    return EXIT_OK


def _positive_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 36_500:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected days > 0, got {text!r}")
    return value


def add_parsers(fleet_sub: argparse._SubParsersAction) -> None:
    p = fleet_sub.add_parser("token", help="API tokens for the REST API and dashboard")
    sub = p.add_subparsers(title="commands")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    create = sub.add_parser("create", help="a new token (printed once)")
    create.add_argument("--role", required=True, choices=[r.value for r in Role],
                        help="read: look; operate: also rollouts and tags; admin: also "
                        "tokens")
    create.add_argument("--name", required=True, help="who or what uses it (audit log)")
    create.add_argument("--expires-days", type=_positive_days,
                        help="refused after this many days (default: never)")
    create.set_defaults(func=cmd_create)
    ls = sub.add_parser("ls", help="tokens (never their secrets)")
    ls.set_defaults(func=cmd_ls)
    revoke = sub.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("id", help="the token's id (edgeship fleet token ls)")
    revoke.set_defaults(func=cmd_revoke)
    for c in (create, ls, revoke):
        c.add_argument("--db", required=True, help="registry: SQLite file or postgresql:// URL")
        c.add_argument("--by", help="who does it (audit log; default: the login name)")
        c.add_argument("--json", action="store_true", help="print JSON")
