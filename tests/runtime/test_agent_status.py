"""The agent says what is wrong: a broker it cannot reach is a WARNING with the next try's
time, /healthz and `edgeship agent status` carry the MQTT state and the last contact, and
`agent status` is a table a person reads (--json for machines)."""

from __future__ import annotations

import json
import logging

import pytest

from edgeship.agent.cli import status_rows
from edgeship.agent.client import AgentClient
from edgeship.agent.config import load_config
from edgeship.cli import main
from edgeship.fleet.broker import free_port
from tests.support import wait_until


def _agent(tmp_path, mqtt_url: str):
    from edgeship.agent.daemon import Agent
    from edgeship.fleet.tuf_repo import init_repository

    init_repository(tmp_path / "keys", tmp_path / "repo")
    (tmp_path / "state/tuf").mkdir(parents=True)
    (tmp_path / "state/tuf/root.json").write_bytes(
        (tmp_path / "repo/metadata/1.root.json").read_bytes())
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "st-1"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'mqtt_url = "{mqtt_url}"\napi_enabled = false\n'
                   "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n")
    agent = Agent(load_config(cfg))
    agent.start()
    return agent, cfg


def test_an_unreachable_broker_is_a_warning_with_the_next_try_and_in_status(
        tmp_path, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="edgeship.common.mqtt")
    url = f"mqtt://127.0.0.1:{free_port()}"
    agent, cfg = _agent(tmp_path, url)
    try:
        warning = wait_until(lambda: next((r for r in caplog.records
                                           if "next try in" in r.getMessage()), None),
                             timeout_s=20, what="a reconnect warning")
        assert warning.levelno == logging.WARNING and url in warning.getMessage()
        with AgentClient(f"unix://{agent.cfg.api_socket_path}", timeout_s=5) as c:
            mqtt = c.health()["mqtt"]
        assert mqtt["state"] in ("waiting to retry", "connecting") and mqtt["url"] == url
        assert mqtt["last_contact"] is None and "cannot connect" in mqtt["error"]
        assert main(["agent", "status", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        line = next(s for s in out.splitlines() if s.startswith("mqtt"))
        assert url in line and "never reached" in line and "next try in" in line, out
    finally:
        agent.stop()


def test_a_connected_agent_reports_its_last_contact(broker, tmp_path, capsys):
    agent, cfg = _agent(tmp_path, broker.url)
    try:
        assert agent.session.wait_connected(10)
        assert main(["agent", "status", "--config", str(cfg), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        mqtt = doc["live"]["health"]["mqtt"]
        assert mqtt["state"] == "connected" and mqtt["last_contact"] is not None
        assert main(["agent", "status", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["device", "st-1"]
        assert any(s.startswith("mqtt") and "connected" in s and "last contact" in s
                   for s in out), out
        assert any(s.split()[:3] == ["model", "none", "installed"] for s in out), out
    finally:
        agent.stop()


@pytest.mark.parametrize("live, expect", [
    (None, "not running"),
    ({"url": "unix:///x", "health": {"status": "ok"}, "serving": {}}, "does not report"),
])
def test_status_rows_without_a_live_agent_or_an_old_one(live, expect):
    doc = {"device": "d", "models": {"m": {"version": 3, "variant": "onnx-int8"}},
           "updates": {"m": {"version": 4, "state": "failed", "reason": "hash_mismatch"}},
           "telemetry": None, "live": live}
    text = "\n".join(f"{k} {v}" for k, v in status_rows(doc, now=1000.0))
    assert expect in text
    assert "model m v3 onnx-int8 (installed)" in text
    assert "update m v4 failed: hash_mismatch" in text
