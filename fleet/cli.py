"""Fleet subcommands of the ``edgeship`` CLI: ``keys init``, ``release``, ``fleet serve``,
``fleet status``. ``edgeship/cli.py`` calls :func:`add_parsers`.

Each command function takes the parsed args and returns an exit code: 0 ok, 1 failure,
2 bad input; errors are one line on stderr (the traceback is logged at DEBUG).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from edgeship.agent.errors import ConfigError, EdgeshipError
from edgeship.common.mqtt import MqttSession, SessionSettings, TlsSettings
from edgeship.agent.protocol import MAX_SPREAD_S, ReleaseAnnouncement, Topics
from edgeship.fleet.cli_base import EXIT_BAD_INPUT, EXIT_OK, _command, _models_text
from edgeship.fleet.db import is_url
from edgeship.fleet.registry import DeviceRecord, Registry
from edgeship.fleet.mqtt_login import MqttLogin, add_login, mqtt_login
from edgeship.fleet.server import TRANSFER_MODES, FleetServer, FleetSettings
from edgeship.fleet.transfer import stop_release
from edgeship.fleet.tuf_repo import (ReleaseInfo, RepoSettings, init_repository, release_bundle,
                            rotate_root)

logger = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 10.0


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    return show


# --- keys init -----------------------------------------------------------------------------

@_command
def cmd_keys_init(args: argparse.Namespace) -> int:
    settings = RepoSettings(root_threshold=args.root_threshold, root_keys=args.root_keys or 0)
    init_repository(args.keys, args.repo, settings, root_keys_dir=args.root_keys_dir)
    where = f"; root keys in {args.root_keys_dir} (keep them offline)" \
        if args.root_keys_dir else ""
    print(f"initialised TUF repository {args.repo} (keys in {args.keys}{where}); provision "
          f"devices with {Path(args.repo) / 'metadata' / '1.root.json'}")
    return EXIT_OK


@_command
def cmd_keys_rotate_root(args: argparse.Namespace) -> int:
    version = rotate_root(args.repo, args.old_root_keys, args.new_root_keys,
                          threshold=args.threshold, keys=args.count or 0)
    print(f"published root v{version} signed by the old and the new root keys (new keys "
          f"in {args.new_root_keys})")
    return EXIT_OK


@_command
def cmd_fleet_stop_release(args: argparse.Namespace) -> int:
    stop_release(args.repo, args.model, args.version, stopped=not args.resume)
    state = "allowed again" if args.resume else "stopped"
    if args.json:
        print(json.dumps({"model": args.model, "version": args.version,
                          "stopped": not args.resume}))
    else:
        print(f"transfers of {args.model} v{args.version} {state}")
    return EXIT_OK


# --- release -------------------------------------------------------------------------------

def announce(url: str, info: ReleaseInfo, timeout_s: float = ANNOUNCE_TIMEOUT_S,
             tls: TlsSettings | None = None, spread_s: float = 0.0,
             login: MqttLogin = MqttLogin()) -> None:
    """Publish the retained announcement with a short-lived session; wait for the PUBACK.
    ``spread_s``: devices start fetching at a per-device offset within this window."""
    session = MqttSession(SessionSettings(url=url, client_id=login.client_id or
                                          f"edgeship-release-{secrets.token_hex(4)}",
                                          clean_start=True, session_expiry_s=0, tls=tls,
                                          username=login.username, password=login.password),
                          on_message=lambda m: None)
    session.start()
    try:
        if not session.wait_connected(timeout_s):
            raise EdgeshipError(f"could not connect to {url} within {timeout_s}s")
        payload = ReleaseAnnouncement(info.model, info.version, info.released_at,
                                      spread_s).to_bytes()
        rc = session.publish_acked(Topics.release(info.model), payload, timeout_s=timeout_s,
                                   retain=True)
        if rc >= 0x80:
            raise EdgeshipError(f"broker refused the announcement (reason code {rc:#x})")
    finally:
        session.stop()


@_command
def cmd_release(args: argparse.Namespace) -> int:
    tls = _tls(args)  # bad flags are refused before anything is signed
    login = mqtt_login(args)
    info = release_bundle(args.bundle, args.repo, args.keys,
                          RepoSettings(deltas=args.deltas,
                                       latency_budget_ms=args.latency_budget_ms,
                                       memory_budgets=_memory_budgets(args.profile)))
    announced = False
    if args.mqtt:
        try:
            announce(args.mqtt, info, tls=tls, spread_s=args.spread_s, login=login)
            announced = True
        except EdgeshipError as e:
            raise EdgeshipError(f"released {info.model} v{info.version} but the announcement "
                                f"failed: {e}") from e
    if args.db:
        registry = Registry(args.db if is_url(args.db) else Path(args.db))
        try:
            registry.add_release(info.model, info.version, info.released_at, "cli")
            if announced:  # the fleet re-sends it to devices that were offline
                registry.note_announcement(info.model, info.version, info.released_at,
                                           args.spread_s)
        finally:
            registry.close()
    exported = _export(args, info.model, info.version) if args.export else None
    if args.json:
        print(json.dumps({"model": info.model, "version": info.version,
                          "targets": list(info.targets), "released_at": info.released_at,
                          "announced": announced,
                          "export": _export_doc(exported) if exported else None}))
    else:
        print(f"released {info.model} v{info.version} ({len(info.targets)} targets)"
              + (f"; announced on {Topics.release(info.model)}" if announced else ""))
        if exported:
            print(_export_text(exported))
    return EXIT_OK


def _export(args: argparse.Namespace, model: str, version: int):
    from edgeship.fleet.export import export_release

    return export_release(args.repo, args.keys, model, version, args.export,
                          valid_days=args.valid_days)


def _export_doc(e) -> dict:
    return {"path": str(e.path), "bytes": e.size, "expires": e.expires.isoformat(),
            "targets": list(e.targets)}


def _export_text(e) -> str:
    return (f"exported {e.model} v{e.version} to {e.path} ({e.size / 1024:.1f} KiB, valid "
            f"until {e.expires:%Y-%m-%d %H:%M} UTC): on a device, edgeship agent install "
            f"{e.path.name} --config /etc/edgeship/agent.toml")


@_command
def cmd_fleet_export(args: argparse.Namespace) -> int:
    exported = _export(args, args.model, args.version)
    print(json.dumps(_export_doc(exported)) if args.json else _export_text(exported))
    return EXIT_OK


def _memory_budgets(profiles: list[str] | None) -> tuple[tuple[str, float], ...]:
    from edgeship import devices

    loaded = [devices.load_profile(p) for p in profiles or ()]
    return tuple((p.name, float(p.model_memory_budget_mb)) for p in loaded)


# --- fleet serve / status --------------------------------------------------------------------

@_command
def cmd_fleet_serve(args: argparse.Namespace) -> int:
    if not (Path(args.repo) / "metadata").is_dir():
        raise ConfigError(f"--repo {args.repo} is not a repository (run 'keys init')",
                          key="repo")
    login = mqtt_login(args)
    if not getattr(args, "verbose", False):  # a server: what it does, at INFO, by default
        logging.getLogger("edgeship").setLevel(logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = FleetServer(FleetSettings(mqtt_url=args.mqtt, repo_dir=Path(args.repo),
                                       client_id=login.client_id, username=login.username,
                                       password=login.password, transfers=args.transfers,
                                       db_path=args.db if is_url(args.db) else Path(args.db),
                                       http_port=args.http_port, http_host=args.http_host,
                                       http=_web_settings(args),
                                       workers=args.workers,
                                       max_transfers=args.max_transfers,
                                       max_transfers_per_device=args.max_transfers_per_device,
                                       max_device_bytes_per_s=args.max_device_bytes_per_s,
                                       keys_dir=Path(args.keys) if args.keys else None,
                                       tls=_tls(args)))
    server.start()
    print(f"fleet server {server.client_id} serving {args.repo} on {args.mqtt} (transfer "
          f"requests: {server.transfer_mode or 'once connected'})", flush=True)
    stop.wait()
    server.stop()
    return EXIT_OK


def _web_settings(args: argparse.Namespace):
    from edgeship.fleet.web.server import WebSettings
    if (args.http_tls_cert is None) != (args.http_tls_key is None):
        raise ConfigError("--http-tls-cert and --http-tls-key go together",
                          key="http_tls_cert")
    if args.http_client_ca is not None and args.http_tls_cert is None:
        raise ConfigError("--http-client-ca needs --http-tls-cert/--http-tls-key",
                          key="http_client_ca")
    for key in ("http_tls_cert", "http_tls_key", "http_client_ca"):
        path = getattr(args, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{key.replace('_', '-')} {path}: no such file", key=key)
    return WebSettings(allowed_hosts=tuple(args.http_allowed_host), tls_cert=args.http_tls_cert,
                       tls_key=args.http_tls_key, client_ca=args.http_client_ca)


def _ago(ts: float | None, now: float) -> str:
    return "" if ts is None else f"{max(0, int(now - ts))}s ago"


def _print_table(devices: list[DeviceRecord]) -> None:
    from rich.console import Console
    from rich.table import Table
    now = time.time()
    table = Table(title=f"{len(devices)} device(s)")
    for col in ("device", "online", "group", "runs", "desired", "last seen", "last event",
                "last failure"):
        table.add_column(col)
    for d in devices:
        desired = ", ".join(f"{m}:v{v}" for m, v in sorted(d.desired.items()))
        table.add_row(d.id, "yes" if d.online else "no", d.group or "",
                      _models_text(d.models), desired, _ago(d.last_seen, now),
                      f"{d.last_event} ({_ago(d.last_event_ts, now)})" if d.last_event else "",
                      d.failure_text or "")
    console = Console()
    if not console.is_terminal:  # piped: one line per device, reasons unwrapped
        console = Console(width=max(console.width, 240))
    console.print(table)


@_command
def cmd_fleet_status(args: argparse.Namespace) -> int:
    if not is_url(args.db) and not Path(args.db).is_file():
        raise ConfigError(f"no registry at {args.db}", key="db")
    registry = Registry(args.db if is_url(args.db) else Path(args.db))
    try:
        devices = registry.devices()
    finally:
        registry.close()
    if args.json:
        print(json.dumps([d.to_dict() for d in devices]))
    else:
        _print_table(devices)
    return EXIT_OK


# --- parsers -------------------------------------------------------------------------------

def _bounded(cast: Callable[[str], float], low: float, high: float | None,
             wanted: str) -> Callable[[str], float]:
    """An argparse ``type=``: ``cast(text)`` within [low, high], else a usage error."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not (low <= value and (high is None or value <= high)):  # NaN too
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


_positive_int = _bounded(int, 1, None, "a positive integer")
_positive = _bounded(float, 1e-3, 3_600_000, "a positive number of milliseconds")
_non_negative_int = _bounded(int, 0, None, "an integer >= 0")
#: ``--spread-s``: seconds in [0, MAX_SPREAD_S] (what a device accepts)
_spread_s = _bounded(float, 0, MAX_SPREAD_S, f"seconds in [0, {MAX_SPREAD_S:.0f}]")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    _add_keys(subparsers)
    _add_release(subparsers)
    _add_fleet(subparsers)


def _add_keys(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="manage repository signing keys")
    keys.set_defaults(func=_help(keys))
    sub = keys.add_subparsers(title="commands")
    init = sub.add_parser("init", help="generate keys and an empty TUF repository")
    init.add_argument("--keys", required=True, type=Path, help="directory for private keys")
    init.add_argument("--repo", required=True, type=Path, help="repository directory")
    init.add_argument("--root-threshold", type=_positive_int, default=1,
                      help="root keys needed to sign root (default 1)")
    init.add_argument("--root-keys", type=_positive_int,
                      help="root keys to generate (default: the threshold)")
    init.add_argument("--root-keys-dir", type=Path,
                      help="separate directory for the root keys, to keep offline")
    init.set_defaults(func=cmd_keys_init)
    rot = sub.add_parser("rotate-root", help="replace the root keys (old and new sign)")
    rot.add_argument("--repo", required=True, type=Path, help="repository directory")
    rot.add_argument("--old-root-keys", required=True, type=Path,
                     help="directory holding the current root keys")
    rot.add_argument("--new-root-keys", required=True, type=Path,
                     help="empty directory for the new root keys")
    rot.add_argument("--threshold", type=_positive_int, default=1,
                     help="root keys needed to sign the next root (default 1)")
    rot.add_argument("--count", type=_positive_int, help="new keys (default: threshold)")
    rot.set_defaults(func=cmd_keys_rotate_root)


def _add_tls(p: argparse.ArgumentParser) -> None:
    """``--tls-ca/--tls-cert/--tls-key``: connect to an ``mqtts://`` broker that wants a client
    certificate (the fleet identity from ``edgeship broker issue fleet NAME``)."""
    p.add_argument("--tls-ca", type=Path, help="CA certificate that signed the broker's")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="client private key (PEM)")


def _tls(args: argparse.Namespace) -> TlsSettings | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", key="tls_cert")
    if args.tls_ca is None:
        if args.tls_cert is not None:
            raise ConfigError("--tls-cert needs --tls-ca", key="tls_ca")
        return None
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{key.replace('_', '-')} {path}: no such file", key=key)
    return TlsSettings(str(args.tls_ca), str(args.tls_cert) if args.tls_cert else None,
                       str(args.tls_key) if args.tls_key else None)


def _add_release(subparsers: argparse._SubParsersAction) -> None:
    rel = subparsers.add_parser("release", help="sign a bundle into the repository")
    rel.add_argument("bundle", type=Path, help="bundle directory, .tar or .tar.zst")
    rel.add_argument("--repo", required=True, type=Path, help="repository directory")
    rel.add_argument("--keys", required=True, type=Path, help="directory of private keys")
    rel.add_argument("--mqtt", help="broker URL: publish the retained release announcement")
    rel.add_argument("--db", help="fleet registry to record the release in (SQLite file "
                     "or postgresql:// URL)")
    rel.add_argument("--json", action="store_true", help="print the result as JSON")
    rel.add_argument("--profile", action="append", metavar="NAME",
                     help="language models: refuse the release unless a variant's weights + "
                          "KV cache fit this board profile's model_memory_budget_mb "
                          "(repeatable)")
    rel.add_argument("--deltas", action="store_true",
                     help="also publish deltas from the previous version (devices holding "
                          "it download only what changed)")
    rel.add_argument("--latency-budget-ms", type=_positive, default=None, metavar="MS",
                     help="the release's latency budget on devices (replaces the one from "
                          "convert; default: that one, else derived from the converter's "
                          "measurement and each board's profile)")
    rel.add_argument("--spread-s", type=_spread_s, default=0.0,
                     help="with --mqtt: devices start fetching at a per-device offset within "
                     "this many seconds (default 0: at once)")
    _add_export(rel)
    _add_tls(rel)
    add_login(rel)
    rel.set_defaults(func=cmd_release)


def _add_export(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--export", type=Path, metavar="FILE", required=required,
                   help="also write the release as one signed archive for devices with no "
                        "broker ('edgeship agent install FILE' there)")
    p.add_argument("--valid-days", type=_bounded(int, 1, 366, "days in [1, 366]"),
                   default=30, help="how long the archive's signed metadata stays valid "
                   "(default 30; re-signs snapshot and timestamp in the repository)")


def _add_fleet(subparsers: argparse._SubParsersAction) -> None:
    fleet = subparsers.add_parser("fleet", help="run or inspect the fleet server")
    fleet.set_defaults(func=_help(fleet))
    sub = fleet.add_subparsers(title="commands")
    serve = sub.add_parser("serve", help="serve transfers and record device reports")
    serve.add_argument("--mqtt", required=True, help="broker URL, mqtt://host:port")
    serve.add_argument("--repo", required=True, type=Path, help="repository directory")
    serve.add_argument("--db", required=True,
                       help="registry: SQLite file or postgresql:// URL")
    serve.add_argument("--http-port", type=int,
                       help="serve the dashboard, REST API and /metrics on this port")
    serve.add_argument("--http-host", default="127.0.0.1", help="address for --http-port")
    serve.add_argument("--http-allowed-host", action="append", default=[], metavar="NAME",
                       help="a name clients use for this server (Host header); loopback "
                       "names and --http-host are always allowed; anything else is refused "
                       "(DNS rebinding)")
    serve.add_argument("--http-tls-cert", type=Path,
                       help="serve the dashboard and API over HTTPS with this certificate")
    serve.add_argument("--http-tls-key", type=Path, help="its private key")
    serve.add_argument("--http-client-ca", type=Path,
                       help="also require a client certificate signed by this CA (the fleet "
                       "CA: edgeship broker ca-init/issue) — mutual TLS, on top of tokens")
    serve.add_argument("--keys", type=Path,
                       help="keys directory: re-sign the timestamp periodically")
    serve.add_argument("--workers", type=_positive_int, default=4, help="worker threads")
    serve.add_argument("--max-transfers", type=_positive_int, default=200,
                       help="concurrent target transfers; more are answered 503 and the "
                       "devices retry with backoff (default 200)")
    serve.add_argument("--max-transfers-per-device", type=_positive_int, default=2,
                       help="transfers one device may hold open; its next one replaces its "
                       "least recently active (default 2)")
    serve.add_argument("--max-device-bytes-per-s", type=_non_negative_int, default=0,
                       help="byte-rate cap per device, enforced by this server (answers are "
                       "paced); 0 = unlimited (default)")
    serve.add_argument("--transfers", choices=TRANSFER_MODES, default="auto",
                       help="auto: through a shared subscription when the broker has one, "
                       "else split by device between the fleet servers sharing --db; split: "
                       "always split; off: none (devices use transport = \"http\")")
    _add_tls(serve)
    add_login(serve, client_id=True)
    serve.set_defaults(func=cmd_fleet_serve)
    kill = sub.add_parser("stop-release",
                          help="kill switch: stop all transfers of a release")
    kill.add_argument("--repo", required=True, type=Path, help="repository directory")
    kill.add_argument("--model", required=True, help="model name")
    kill.add_argument("--version", required=True, type=_positive_int, help="model version")
    kill.add_argument("--resume", action="store_true", help="lift the stop instead")
    kill.add_argument("--json", action="store_true", help="print JSON")
    kill.set_defaults(func=cmd_fleet_stop_release)
    export = sub.add_parser("export", help="a released version as one signed archive for "
                                           "devices with no broker")
    export.add_argument("model", help="model name")
    export.add_argument("version", type=_positive_int, help="model version")
    export.add_argument("--repo", required=True, type=Path, help="repository directory")
    export.add_argument("--keys", required=True, type=Path, help="directory of private keys")
    _add_export(export, required=True)
    export.add_argument("--json", action="store_true", help="print JSON")
    export.set_defaults(func=cmd_fleet_export)
    from edgeship.fleet import cli_tokens
    cli_tokens.add_parsers(sub)
    status = sub.add_parser("status", help="show devices from the registry")
    status.add_argument("--db", required=True,
                        help="registry: SQLite file or postgresql:// URL")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_fleet_status)
    from edgeship.fleet import cli_quality
    cli_quality.add_parsers(sub)
