"""How host-side commands log in to the broker: ``--mqtt-username`` (or ``user@`` in the
URL), a password read from ``--mqtt-password-file`` (never a password on the command line,
where ``ps`` shows it), ``--client-id`` where a stable id matters (broker ACLs keyed on it)."""

from __future__ import annotations

import argparse
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from edgeship.agent.config import read_secret
from edgeship.agent.errors import ConfigError


@dataclass(frozen=True)
class MqttLogin:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""  # "" = a generated one


def add_login(p: argparse.ArgumentParser, *, client_id: bool = False) -> None:
    p.add_argument("--mqtt-username", help="MQTT user name (also: mqtt://USER@host:port)")
    p.add_argument("--mqtt-password-file", type=Path,
                   help="file whose first line is the MQTT password")
    if client_id:
        p.add_argument("--client-id", default="",
                       help="MQTT client id, kept across restarts (default: generated); "
                       "also this server's name among the fleet servers of one registry")


def mqtt_login(args: argparse.Namespace, url: str | None = None) -> MqttLogin:
    """From ``--mqtt-username``/``--mqtt-password-file``/``--client-id`` and the broker URL
    (``args.mqtt`` unless given)."""
    url = url if url is not None else getattr(args, "mqtt", None) or ""
    parsed = urllib.parse.urlparse(url)
    if parsed.password is not None:
        raise ConfigError("a password in the MQTT URL would show in the process list: put it "
                          "in a file and pass --mqtt-password-file", key="mqtt")
    username = args.mqtt_username or (urllib.parse.unquote(parsed.username)
                                      if parsed.username else None)
    password = None
    if args.mqtt_password_file is not None:
        if username is None:
            raise ConfigError("--mqtt-password-file needs --mqtt-username (or USER@ in the "
                              "URL)", key="mqtt_username")
        password = read_secret(args.mqtt_password_file, "--mqtt-password-file")
    return MqttLogin(username, password, getattr(args, "client_id", "") or "")
