"""The broker config text and the `edgeship broker` commands (pure and file-level; the real
Mosquitto behaviour is in test_broker_lockdown.py)."""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from edgeship.agent.errors import ConfigError
from edgeship.cli import main
from edgeship.fleet.broker_config import BrokerSettings, acl_text, mosquitto_conf


def test_conf_is_locked_down():
    conf = mosquitto_conf(BrokerSettings(port=8883))
    for line in ("allow_anonymous false", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 "listener 8883 0.0.0.0", "crlfile /etc/mosquitto/edgeship/crl.pem"):
        assert line + "\n" in conf
    assert "allow_anonymous true" not in conf and "listener 1883" not in conf


def test_acl_gives_devices_only_their_own_topics_and_fleet_everything():
    acl = acl_text(["fleet:server-1"], ["ops:watch"])
    lines = acl.splitlines()
    assert "pattern read edgeship/v1/dev/%u/desired" in lines
    assert "pattern write edgeship/v1/transfer/req/%u" in lines
    assert not any(ln.startswith("topic") and "%u" not in ln and "fleet/releases" not in ln
                   for ln in lines[:lines.index("user fleet:server-1")])
    fleet = lines[lines.index("user fleet:server-1") + 1]
    assert fleet == "topic readwrite edgeship/v1/#"
    assert lines[lines.index("user ops:watch") + 1] == "topic read edgeship/v1/#"
    assert not any("write edgeship/v1/dev/%u/desired" in ln for ln in lines)


@pytest.mark.parametrize("bad", ["server-1", "fleet:a b", "fleet:#", "dev-a"])
def test_acl_refuses_identities_that_are_not_fleet_identities(bad):
    with pytest.raises(ConfigError):
        acl_text([bad])


def test_broker_commands(tmp_path, capsys):
    ca = str(tmp_path / "ca")
    assert main(["broker", "ca-init", "--ca-dir", ca]) == 0
    assert main(["broker", "ca-init", "--ca-dir", ca]) == 2  # never replace a CA
    assert "refusing to replace" in capsys.readouterr().err
    assert main(["broker", "issue", "fleet", "server-1", "--ca-dir", ca,
                 "--out", str(tmp_path / "fc"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["identity"] == "fleet:server-1"
    assert main(["broker", "config", "--ca-dir", ca, "--out", str(tmp_path / "bc"),
                 "--host", "broker.example.com", "--host", "10.0.0.5"]) == 0
    assert "user fleet:server-1" in (tmp_path / "bc/acl").read_text()
    cert = x509.load_pem_x509_certificate((tmp_path / "bc/broker.example.com.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["broker.example.com", "10.0.0.5"]
    capsys.readouterr()
    assert main(["broker", "revoke", "fleet:server-1", "--ca-dir", ca,
                 "--config-dir", str(tmp_path / "bc")]) == 0
    assert "user fleet:server-1" not in (tmp_path / "bc/acl").read_text()
    crl = x509.load_pem_x509_crl((tmp_path / "bc/crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(doc["serial"], 16)) is not None
    assert main(["broker", "revoke", "nobody", "--ca-dir", ca]) == 2
    capsys.readouterr()
    assert main(["broker", "certs", "--ca-dir", ca, "--json"]) == 0
    roles = {c["cn"]: (c["role"], bool(c["revoked_at"]))
             for c in json.loads(capsys.readouterr().out)}
    assert roles == {"fleet:server-1": ("fleet", True),
                     "broker.example.com": ("broker", False)}
