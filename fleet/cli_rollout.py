"""``edgeship rollout start|status|pause|resume|abort|rollback`` and ``edgeship devices
ls|tag``. They work on the registry (a SQLite path or a ``postgresql://`` URL); the fleet
server's rollout runner carries out what they record. Exit codes: 0 ok, 1 failure, 2 bad
input (one line on stderr)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgeship.fleet.cli_base import EXIT_OK, _command, _models_text
from edgeship.fleet.db import is_url
from edgeship.fleet.registry import Registry
from edgeship.fleet.rollout import Gates, Policy, Rollout, parse_waves, version_text
from edgeship.fleet.rollout_runner import LEASE_NAME, control, load, progress, start_rollout

from edgeship.agent.errors import ConfigError


def open_registry(db: str) -> Registry:
    if not is_url(db) and not Path(db).is_file():
        raise ConfigError(f"no registry at {db}", key="db")
    return Registry(db if is_url(db) else Path(db))


def _actor(args: argparse.Namespace) -> str:
    if args.by:
        return args.by
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container
        return "unknown"


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, default=str, sort_keys=True))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


# --- rollout ---------------------------------------------------------------------------------

def policy_from_args(args: argparse.Namespace) -> Policy:
    gates = Gates(min_install_success=args.min_install_success,
                  max_error_rate=args.max_error_rate, max_latency_ratio=args.max_latency_ratio,
                  min_shadow_agreement=args.shadow_agreement, min_requests=args.min_requests)
    waves = (1.0,) if args.all_or_none else parse_waves(args.waves)
    return Policy(waves=waves, on_failure=args.on_failure, soak_s=args.soak_s,
                  wave_timeout_s=args.wave_timeout_s, max_concurrent=args.max_concurrent,
                  jitter_s=args.jitter_s, all_or_none=args.all_or_none, offline=args.offline,
                  offline_grace_s=args.offline_grace_s, gates=gates)


def _act(args: argparse.Namespace, action: Callable[[Registry], Rollout],
         said: Callable[[Rollout], str]) -> int:
    """Record ``action`` in the registry; print the rollout's progress (``--json``) or
    ``said``'s line about it."""
    registry = open_registry(args.db)
    try:
        r = action(registry)
        doc = progress(registry, r)
    finally:
        registry.close()
    if args.json:
        _print_json(doc)
    else:
        print(said(r))
    return EXIT_OK


@_command
def cmd_start(args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    return _act(args, lambda registry: start_rollout(
        registry, model=args.model, version=args.version, policy=policy, actor=_actor(args),
        group=args.group, tag=args.tag, from_version=args.from_version),
        lambda r: f"rollout {r.id}: {r.model} {version_text(r.from_version)} -> "
                  f"{version_text(r.to_version)}, waves of {[len(w) for w in r.waves]} "
                  "devices; the fleet server carries it out")


def _print_rollout(doc: dict[str, Any]) -> None:
    print(f"rollout {doc['id']}: {doc['model']} {doc['from_text']} -> {doc['to_text']}  "
          f"state={doc['state']}  wave {doc['wave']}/{len(doc['waves'])}  told "
          f"{doc['moved']}/{doc['devices']}  serving {doc['serving']}/{doc['devices']}  "
          f"by {doc['created_by']}")
    if doc.get("phase"):
        print(f"all-or-none: {doc['phase']} ({sum(w['held'] for w in doc['waves'])}/"
              f"{doc['devices']} held; nothing switches before the commit)")
    if doc.get("runner"):
        print(f"runner: {doc['runner']['holder']} (lease until "
              f"{time.strftime('%H:%M:%S', time.localtime(doc['runner']['expires_at']))})")
    if doc["reason"]:
        print(f"reason: {doc['reason']}")
    for w in doc["waves"]:
        if w["waiting"]:
            print(f"wave {w['wave']} waits: {w['waiting']}")
        for o in w["offline_devices"]:
            print(f"  {o['device']} offline since "
                  f"{time.strftime('%H:%M:%S', time.localtime(o['last_seen']))}, deadline "
                  f"{time.strftime('%H:%M:%S', time.localtime(o['deadline']))}")
        if w["failed_devices"]:
            print(f"wave {w['wave']} failed on: " + ", ".join(
                f"{d} ({r})" for d, r in w["failed_devices"].items()))
    _table("waves", ["wave", "devices", "sent", "held", "serving", "failed", "status",
                     "verdict"],
           [[str(w["wave"]), str(w["devices"]), str(w["sent"]), str(w["held"]),
             str(w["serving"]), str(w["failed"]), w["status"],
             (w["verdict"] or {}).get("reason", "")] for w in doc["waves"]])


@_command
def cmd_status(args: argparse.Namespace) -> int:
    registry = open_registry(args.db)
    try:
        if args.rollout:
            doc = progress(registry, load(registry, args.rollout))
            doc["audit"] = registry.audit_log(args.rollout)
            lease = registry.lease(LEASE_NAME)
            doc["runner"] = lease and {"holder": lease[0], "expires_at": lease[1]}
            docs = [doc]
        else:
            docs = [progress(registry, load(registry, d["id"])) for d in registry.rollouts()]
    finally:
        registry.close()
    if args.json:
        _print_json(docs[0] if args.rollout else docs)
    elif args.rollout:
        _print_rollout(docs[0])
        for e in docs[0]["audit"]:
            when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
            print(f"  {when} {e['actor']:<8} {e['action']:<22} {e.get('reason', '')}")
    else:
        _table(f"{len(docs)} rollout(s)", ["id", "model", "versions", "state", "wave",
                                            "moved", "reason"],
               [[d["id"], d["model"], f"{d['from_text']} -> {d['to_text']}",
                 d["state"], f"{d['wave']}/{len(d['waves'])}",
                 f"{d['moved']} told, {d['serving']} serving / {d['devices']}",
                 d["reason"]] for d in docs])
    return EXIT_OK


@_command
def cmd_control(args: argparse.Namespace) -> int:
    return _act(args, lambda registry: control(registry, args.rollout, args.rollout_cmd,
                                               _actor(args), args.reason or ""),
                lambda r: f"rollout {r.id} is now {r.state.value}")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rollout", help="staged rollouts gated on model quality")
    p.set_defaults(func=lambda a: (p.print_help(sys.stderr), 2)[1])
    sub = p.add_subparsers(dest="rollout_cmd", metavar="COMMAND")
    start = sub.add_parser("start", help="roll a released version out to a group in waves")
    start.add_argument("model")
    start.add_argument("version", type=int)
    start.add_argument("--group", help="devices of this group (default: all)")
    start.add_argument("--tag", help="only devices with this tag")
    start.add_argument("--from-version", type=int, help="baseline version (default: the one "
                       "most target devices run)")
    start.add_argument("--waves", default="1,10,50,100",
                       help="cumulative percentages (default 1,10,50,100)")
    start.add_argument("--on-failure", choices=("pause", "rollback"), default="pause")
    start.add_argument("--all-or-none", action="store_true",
                       help="one simultaneous switch for the whole group: every device "
                       "downloads, verifies and health-checks the version without switching "
                       "(held); when all have, one commit switches them all; if any fails "
                       "or --wave-timeout-s passes first, all discard it and none switches. "
                       "Devices offline at the commit switch when they return "
                       "(docs/rollouts.md)")
    start.add_argument("--soak-s", type=float, default=30.0)
    start.add_argument("--wave-timeout-s", type=float, default=900.0)
    start.add_argument("--max-concurrent", type=int, default=50,
                       help="devices downloading at once")
    start.add_argument("--jitter-s", type=float, default=10.0)
    start.add_argument("--min-install-success", type=float, default=0.95)
    start.add_argument("--max-error-rate", type=float, default=0.02)
    start.add_argument("--max-latency-ratio", type=float, default=1.5,
                       help="new/old p50 on the same devices")
    start.add_argument("--shadow-agreement", type=float, default=None,
                       help="require this top-1 agreement (0..1) in the devices' shadow "
                       "runs (default: the threshold of the release's own shadow policy, "
                       "when it asks for shadow testing)")
    start.add_argument("--min-requests", type=int, default=20)
    start.add_argument("--offline", choices=("wait", "skip", "fail"), default="wait",
                       help="a device of the wave that is offline past its deadline: wait "
                       "for it (until --wave-timeout-s), skip it, or count it as failed "
                       "(default wait)")
    start.add_argument("--offline-grace-s", type=float, default=300.0,
                       help="an offline device's deadline: the later of the wave's start "
                       "and when it was last seen, plus this (default 300)")
    start.set_defaults(func=cmd_start)
    status = sub.add_parser("status", help="rollouts, or one rollout by wave with its log")
    status.add_argument("rollout", nargs="?")
    status.set_defaults(func=cmd_status)
    parsers = [start, status]
    for name, text in (("pause", "stop moving devices (resume continues)"),
                       ("resume", "continue a paused or halted rollout"),
                       ("abort", "kill switch: stop, stop transfers in flight"),
                       ("rollback", "return moved devices to the previous version")):
        c = sub.add_parser(name, help=text)
        c.add_argument("rollout")
        c.add_argument("--reason", help="recorded in the audit log")
        c.set_defaults(func=cmd_control)
        parsers.append(c)
    for c in parsers:
        c.add_argument("--db", required=True, help="registry: SQLite file or postgresql:// URL")
        c.add_argument("--by", help="who does it (audit log; default: the login name)")
        c.add_argument("--json", action="store_true", help="print JSON")


# --- devices ls | tag ------------------------------------------------------------------------

@_command
def cmd_devices_ls(args: argparse.Namespace) -> int:
    registry = open_registry(args.db)
    try:
        devices = registry.devices(group=args.group, tag=args.tag)
    finally:
        registry.close()
    if args.json:
        _print_json([d.to_dict() for d in devices])
        return EXIT_OK
    _table(f"{len(devices)} device(s)", ["device", "online", "group", "tags", "profile",
                                          "runs", "desired", "last event"],
           [[d.id, "yes" if d.online else "no", d.group or "", ",".join(d.tags),
             d.profile or "", _models_text(d.models),
             ", ".join(f"{m}:v{v}" for m, v in sorted(d.desired.items())),
             d.last_event or ""] for d in devices])
    return EXIT_OK


@_command
def cmd_devices_tag(args: argparse.Namespace) -> int:
    if not (args.add or args.remove or args.group is not None):
        raise ConfigError("nothing to do: give --add, --remove or --group", key="tag")
    registry = open_registry(args.db)
    try:
        for device in args.device:
            registry.tag(device, add=args.add, remove=args.remove)
            if args.group is not None:
                registry.set_group(device, args.group or None)
        registry.audit(_actor(args), "devices.tag", None, devices=args.device, add=args.add,
                       remove=args.remove, group=args.group)
        devices = [d for d in registry.devices() if d.id in args.device]
    finally:
        registry.close()
    if args.json:
        _print_json([d.to_dict() for d in devices])
    else:
        for d in devices:
            print(f"{d.id}: group={d.group or '-'} tags={','.join(d.tags) or '-'}")
    return EXIT_OK


def add_device_commands(dsub: argparse._SubParsersAction) -> None:
    ls = dsub.add_parser("ls", help="devices in the fleet registry")
    ls.add_argument("--group")
    ls.add_argument("--tag")
    ls.set_defaults(func=cmd_devices_ls)
    tag = dsub.add_parser("tag", help="add/remove tags, set the group of devices")
    tag.add_argument("device", nargs="+")
    tag.add_argument("--add", action="append", default=[], metavar="TAG")
    tag.add_argument("--remove", action="append", default=[], metavar="TAG")
    tag.add_argument("--group", help="set the group ('' clears it)")
    tag.set_defaults(func=cmd_devices_tag)
    for c in (ls, tag):
        c.add_argument("--db", required=True, help="registry: SQLite file or postgresql:// URL")
        c.add_argument("--by", help="who does it (audit log)")
        c.add_argument("--json", action="store_true", help="print JSON")
