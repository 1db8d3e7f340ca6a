"""``edgeship broker check``: the feature table and the mode, on Mosquitto (shared
subscriptions) and aedes 2 (none; a login), and a clear exit 1 when edgeship cannot run."""

from __future__ import annotations

import json

from edgeship.cli import main
from tests.brokers.conftest import PASSWORD, USER


def _check(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["broker", "check", *argv, "--json", "--timeout-s", "3"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else {}


def _results(report: dict) -> dict[str, bool | None]:
    return {c["feature"]: c["ok"] for c in report["checks"]}


def test_mosquitto_has_everything_and_runs_with_shared_subscriptions(shared_broker, capsys):
    rc, report = _check(capsys, shared_broker.url)
    assert rc == 0 and report["usable"]
    assert all(_results(report).values()), report["checks"]
    assert "shared subscription" in report["mode"][0]


def test_aedes_needs_the_login_and_then_runs_split(aedes_login, tmp_path, capsys):
    rc, report = _check(capsys, aedes_login.url)
    assert rc == 1 and not report["usable"]
    assert "--mqtt-password-file" in report["fatal"][0]
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    rc, report = _check(capsys, aedes_login.url, "--mqtt-username", USER,
                        "--mqtt-password-file", str(secret))
    assert rc == 0, report
    results = _results(report)
    assert results["shared subscriptions"] is False
    shared = next(c for c in report["checks"] if c["feature"] == "shared subscriptions")
    assert "SUBACK 0x9e" in shared["detail"]
    for feature in ("request/response", "user properties", "payload size",
                    "retained across reconnect", "persistent sessions", "last will (LWT)"):
        assert results[feature], feature
    assert "split by device" in report["mode"][0]


def test_no_broker_is_exit_1_and_a_password_in_the_url_is_bad_input(capsys):
    from edgeship.fleet.broker import free_port
    rc, report = _check(capsys, f"mqtt://127.0.0.1:{free_port()}")
    assert rc == 1 and "no CONNACK" in report["fatal"][0]
    rc = main(["broker", "check", "mqtt://user:secret@127.0.0.1:1883"])
    assert rc == 2 and "--mqtt-password-file" in capsys.readouterr().err
