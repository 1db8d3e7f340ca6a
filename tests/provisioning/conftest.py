from __future__ import annotations

import getpass
import queue
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeship.common.mqtt import Message, MqttSession, SessionSettings, TlsSettings
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.broker_config import write_broker_config
from edgeship.fleet.pki import CertificateAuthority


@dataclass
class LockedBroker:
    """A real Mosquitto running the generated locked-down config, and the fleet CA."""

    ca: CertificateAuthority
    mosq: Mosquitto
    conf_dir: Path
    certs: Path
    preissued: dict

    @property
    def url(self) -> str:
        return self.mosq.url

    def identity(self, role: str, name: str):
        """Fleet and operator identities were issued before the ACL was written."""
        if role in ("fleet", "operator"):
            return self.preissued[f"{role}/{name}"]
        return self.ca.issue(role, name, self.certs)

    def session(self, issued, client_id: str | None = None,
                subscriptions=()) -> tuple[MqttSession, "queue.Queue[Message]"]:
        inbox: queue.Queue[Message] = queue.Queue()
        tls = TlsSettings(str(self.ca.cert_path), str(issued.cert_path), str(issued.key_path))
        s = MqttSession(SessionSettings(url=self.url, client_id=client_id or issued.cn,
                                        clean_start=True, session_expiry_s=0, tls=tls,
                                        reconnect_max_s=2), inbox.put)
        s.start(list(subscriptions))
        return s, inbox


@pytest.fixture
def locked_broker(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    certs = tmp_path / "certs"
    preissued = {"fleet/server-1": ca.issue("fleet", "server-1", certs),
                 "operator/watch": ca.issue("operator", "watch", certs)}
    port = free_port()
    conf, _ = write_broker_config(tmp_path / "broker", ca, port=port, bind="127.0.0.1",
                                  hosts=("localhost", "127.0.0.1"),
                                  persistence_dir=tmp_path / "broker",
                                  run_as_user=getpass.getuser())
    mosq = Mosquitto(port=port, config_text=conf.read_text(), tls=True).start()
    yield LockedBroker(ca, mosq, tmp_path / "broker", certs, preissued)
    mosq.cleanup()
