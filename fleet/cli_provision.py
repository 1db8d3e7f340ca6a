"""`edgeship provision DEVICE_ID ...` and `edgeship broker {ca-init,issue,config,revoke,certs}`.

Typical first day::

    edgeship broker ca-init --ca-dir fleet-ca
    edgeship broker issue fleet server-1 --ca-dir fleet-ca --out fleet-certs
    edgeship broker config --ca-dir fleet-ca --out /etc/mosquitto/edgeship \\
        --host broker.example.com --user mosquitto      # then include it in mosquitto.conf
    edgeship provision pi-0001 --profile rpi4 --broker mqtts://broker.example.com:8883 \\
        --ca-dir fleet-ca --repo repo --out enroll/pi-0001 --image 2024-raspios-lite.img
    edgeship broker revoke pi-0001 --ca-dir fleet-ca --config-dir /etc/mosquitto/edgeship

Another broker (EMQX, HiveMQ, a cluster ...): ``edgeship broker check mqtt://host:1883``
says whether edgeship runs on it and how.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from edgeship.agent.errors import ConfigError
from edgeship.common.mqtt import BrokerAddress
from edgeship.fleet.broker_config import refresh_acl_and_crl, write_broker_config
from edgeship.fleet.pki import CertificateAuthority, identity_for
from edgeship.fleet.provision import EnrollmentSettings, build_enrollment, write_boot_partition


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _provision_parser(sub)
    b = sub.add_parser("broker", help="fleet CA, broker configuration, revocation")
    bsub = b.add_subparsers(dest="broker_cmd", required=True, metavar="COMMAND")
    p = bsub.add_parser("ca-init", help="create the fleet certificate authority")
    _ca_dir(p)
    p.add_argument("--name", default="edgeship fleet CA", help="the CA's common name")
    p.set_defaults(func=cmd_ca_init)
    p = bsub.add_parser("issue", help="a certificate for a fleet server or an operator")
    p.add_argument("role", choices=("fleet", "operator"))
    p.add_argument("name", help="e.g. server-1; the identity becomes fleet:server-1")
    _ca_dir(p)
    p.add_argument("--out", type=Path, required=True, help="directory for NAME.key/.crt")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_issue)
    p = bsub.add_parser("config", help="write a locked-down Mosquitto config (TLS, ACLs)")
    _ca_dir(p)
    p.add_argument("--out", type=Path, required=True, help="config directory to write")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--host", action="append", default=[],
                   help="broker DNS name or IP in its certificate (repeat; default localhost)")
    p.add_argument("--persistence-dir", type=Path, default=Path("/var/lib/mosquitto"))
    p.add_argument("--user", help="user Mosquitto runs as (it must read the files)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_broker_config)
    p = bsub.add_parser("revoke", help="revoke a device (or fleet:NAME) certificate")
    p.add_argument("identity", help="device id, fleet:NAME or ops:NAME")
    _ca_dir(p)
    p.add_argument("--config-dir", type=Path,
                   help="broker config directory: refresh its crl.pem and acl")
    p.set_defaults(func=cmd_revoke)
    p = bsub.add_parser("certs", help="list the certificates the CA issued")
    _ca_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_certs)
    _check_parser(bsub)


def _check_parser(bsub: argparse._SubParsersAction) -> None:
    from edgeship.fleet.cli import _add_tls
    from edgeship.fleet.mqtt_login import add_login
    p = bsub.add_parser("check", help="probe a broker for the MQTT 5 features edgeship uses "
                        "and say how edgeship will run on it (exit 1: it cannot)")
    p.add_argument("url", metavar="URL", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--also", metavar="URL", help="another node of the same cluster: every "
                   "probe message is received there")
    p.add_argument("--timeout-s", type=float, default=5.0, help="wait per probe (default 5)")
    p.add_argument("--json", action="store_true")
    _add_tls(p)
    add_login(p)
    p.set_defaults(func=cmd_check)


def _provision_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("provision", help="enroll a device: key, certificate, config, TUF "
                                         "root (and write them onto a Pi OS image)")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--profile", required=True, help="board profile (edgeship devices profiles)")
    p.add_argument("--broker", required=True, help="mqtts://HOST:PORT the device connects to")
    _ca_dir(p)
    p.add_argument("--repo", type=Path, required=True, help="the fleet's TUF repository")
    p.add_argument("--out", type=Path, help="bundle directory (default: enroll/DEVICE_ID)")
    p.add_argument("--api-port", type=int, default=8470)
    p.add_argument("--wheelhouse", type=Path, metavar="DIR",
                   help="wheels for the device (edgeship + its dependencies for the board's "
                        "platform; scripts/wheelhouse makes them): carried in the bundle, "
                        "installed with no index, so the first boot needs no internet")
    p.add_argument("--pip-spec", default="",
                   help="what the device installs without a wheelhouse: a wheel URL pinned "
                        "with #sha256=..., a git URL at a commit, or a path on the device")
    p.add_argument("--image", type=Path,
                   help="Raspberry Pi OS image, boot partition image or SD card partition: "
                        "copy the bundle and a first-boot hook onto its FAT boot partition")
    p.add_argument("--method", choices=("auto", "cloud-init", "firstrun"), default="auto",
                   help="first-boot hook (auto: cloud-init if the image uses it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_provision)


def _ca_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-dir", type=Path, required=True, help="fleet CA directory")


def _out(args: argparse.Namespace, doc: dict, text: str) -> int:
    print(json.dumps(doc, indent=2) if getattr(args, "json", False) else text)
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    out = args.out or Path("enroll") / args.device_id
    s = EnrollmentSettings(device_id=args.device_id, profile=args.profile,
                           mqtt_url=args.broker, repo_dir=args.repo, api_port=args.api_port,
                           pip_spec=args.pip_spec, wheelhouse=args.wheelhouse)
    if args.image is not None:
        if not args.image.exists():
            raise ConfigError(f"image {args.image} does not exist", key="image")
        if not (args.wheelhouse or args.pip_spec):
            raise ConfigError("--image needs --wheelhouse DIR (offline) or --pip-spec: the "
                              "first boot must know what to install", key="image")
    bundle = build_enrollment(s, CertificateAuthority(args.ca_dir), out)
    doc = {"device_id": s.device_id, "bundle": str(bundle), "files": sorted(
        p.name for p in bundle.iterdir())}
    text = f"enrollment bundle for {s.device_id} ({s.profile}) in {bundle}"
    if not (args.wheelhouse or args.pip_spec):
        text += ("\nit names nothing to install: on the device run install-agent --bundle "
                 "DIR --pip-spec WHEEL (or provision with --wheelhouse)")
    if args.image is not None:
        try:
            method = write_boot_partition(args.image, bundle, args.method)
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)  # all or nothing
            raise
        doc.update(image=str(args.image), method=method)
        text += f"\nwritten onto {args.image} (/edgeship, first boot via {method})"
    return _out(args, doc, text)


def cmd_ca_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(args.ca_dir, name=args.name)
    print(f"fleet CA in {ca.dir} (keep ca.key offline or on the fleet host only)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    issued = CertificateAuthority(args.ca_dir).issue(args.role, args.name, args.out)
    return _out(args, {"identity": issued.cn, "key": str(issued.key_path),
                       "cert": str(issued.cert_path), "serial": f"{issued.serial:x}"},
                f"{issued.cn}: {issued.cert_path}, {issued.key_path}\n"
                "re-run 'edgeship broker config' (or revoke --config-dir) so the ACL "
                "knows this identity")


def cmd_broker_config(args: argparse.Namespace) -> int:
    ca = CertificateAuthority(args.ca_dir)
    conf, s = write_broker_config(args.out, ca, port=args.port, bind=args.bind,
                                  hosts=tuple(args.host) or ("localhost",),
                                  persistence_dir=args.persistence_dir, run_as_user=args.user)
    return _out(args, {"config": str(conf), "acl": str(s.acl_file), "port": s.port},
                f"wrote {conf} and {s.acl_file}\nrun: mosquitto -c {conf}"
                + (f"\nchown -R {args.user}: {args.out}" if args.user else ""))


def cmd_revoke(args: argparse.Namespace) -> int:
    ca = CertificateAuthority(args.ca_dir)
    ident = args.identity if ":" in args.identity else identity_for("device", args.identity)
    serials = ca.revoke(ident)
    if args.config_dir is not None:
        refresh_acl_and_crl(args.config_dir, ca)
    print(f"revoked {len(serials)} certificate(s) of {ident}"
          + (f"; refreshed {args.config_dir}/crl.pem" if args.config_dir else "")
          + "\nrestart mosquitto: it reads the CRL when it starts")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    certs = CertificateAuthority(args.ca_dir).certificates()
    if args.json:
        print(json.dumps(certs, indent=2))
        return 0
    for c in certs:
        state = f"revoked {c['revoked_at']}" if c["revoked_at"] else "valid"
        print(f"{c['serial']:>40}  {c['role']:<8} {c['cn']:<28} {state}")
    return 0




def cmd_check(args: argparse.Namespace) -> int:
    from edgeship.fleet.broker_check import CheckSettings, check_broker
    from edgeship.fleet.cli import _command, _tls
    from edgeship.fleet.mqtt_login import mqtt_login

    @_command
    def run(args: argparse.Namespace) -> int:
        login = mqtt_login(args, args.url)
        for url in filter(None, (args.url, args.also)):
            BrokerAddress.parse(url)  # a bad URL is bad input (exit 2)
        settings = CheckSettings(url=args.url, other_url=args.also, username=login.username,
                                 password=login.password, tls=_tls(args),
                                 timeout_s=args.timeout_s)
        mqtt_log = logging.getLogger("edgeship.common.mqtt")
        level = mqtt_log.level
        if not getattr(args, "verbose", False):  # the table says it; no reconnect chatter
            mqtt_log.setLevel(logging.CRITICAL)
        try:
            report = check_broker(settings)
        finally:
            mqtt_log.setLevel(level)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            _print_check(report, args.also)
        return 0 if report.usable else 1
    return run(args)


def _print_check(report, also: str | None, width: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=width)
    table = Table(title=f"{report.url}" + (f" (received on {also})" if also else ""))
    for col in ("feature", "result", "detail"):
        table.add_column(col)
    for c in report.checks:
        mark = {True: "yes", False: "NO" if c.required else "no", None: "-"}[c.ok]
        table.add_row(c.feature + (" *" if c.required else ""), mark, c.detail)
    console.print(table)
    console.print("* required by edgeship")
    if report.fatal:
        console.print("edgeship cannot run on this broker: " + "; ".join(report.fatal))
        return
    for line in report.mode:
        console.print(f"mode: {line}")
