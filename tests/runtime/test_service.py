"""The agent as a service: the systemd unit, the notify protocol, config errors that name the
key, journal-friendly logs, and `edgeship agent status`."""

from __future__ import annotations

import configparser
from importlib import resources
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest

from edgeship.agent.cli import _JournalFormatter
from edgeship.agent.sdnotify import SdNotifier

# the installed package's copy (the one install-agent and the wheel carry)
UNIT = resources.files("edgeship.devices") / "edgeship-agent.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read_string(UNIT.read_text())
    return cp


def test_unit_is_notify_with_watchdog_restart_dedicated_user_and_hardening():
    svc = _unit()["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"].rstrip("s")) > 0
    assert svc["Restart"] == "on-failure"
    assert svc["User"] not in ("", "root") and svc["Group"] not in ("", "root")
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                      ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                      ("CapabilityBoundingSet", ""), ("RestrictSUIDSGID", "yes")):
        assert svc[key] == want, key
    assert "agent run --config" in svc["ExecStart"]


def test_unit_passes_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "edgeship-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgeship/venv/bin/edgeship",
                                             sys.executable))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if str(unit.name) in line]
    assert problems == [], problems


def test_sd_notify_sends_ready_watchdog_stopping_over_the_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "3000000",
                    "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_s == 3.0
    assert n.ready("serving 1 model(s)") and n.watchdog() and n.stopping()
    got = [sock.recv(1024).decode() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=serving 1 model(s)", "WATCHDOG=1", "STOPPING=1"]


def test_sd_notify_is_a_noop_outside_systemd_and_never_blocks(tmp_path):
    assert not SdNotifier({}).ready()
    assert SdNotifier({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}).watchdog_s is None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "n"))  # nobody reads: the queue fills up
    n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "n")})
    results = [n.watchdog() for _ in range(5000)]
    assert results[0] and not all(results)  # later ones dropped, none blocked


def test_journal_lines_carry_the_syslog_priority():
    fmt = _JournalFormatter("%(name)s: %(message)s")
    rec = logging.LogRecord("agent.x", logging.WARNING, __file__, 1, "disk %s", ("full",),
                            None)
    assert fmt.format(rec) == "<4>agent.x: disk full"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeship.cli", "agent", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("line,key", [("spool_max_records = 0", "spool_max_records"),
                                      ('log_level = "loud"', "log_level"),
                                      ("metrics_port = 70000", "metrics_port"),
                                      ('reconnect_max_s = "soon"', "reconnect_max_s"),
                                      ("telemetry_intervall_s = 5", "telemetry_intervall_s")])
def test_agent_run_with_a_bad_key_exits_2_naming_the_key(tmp_path, line, key):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "d1"\nstate_dir = "{tmp_path}"\n{line}\n')
    out = _cli("run", "--config", str(cfg))
    assert out.returncode == 2
    assert key in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_agent_status_reports_models_and_the_telemetry_queue(tmp_path):
    from edgeship.agent.spool import SpoolSettings, TelemetrySpool

    spool = TelemetrySpool(SpoolSettings(tmp_path / "telemetry.db", max_records=2))
    for _ in range(3):
        spool.push(lambda seq: b"{}")
    spool.close()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "d1"\nstate_dir = "{tmp_path}"\napi_port = 1\n')
    out = _cli("status", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["device"] == "d1" and doc["live"] is None
    assert doc["telemetry"]["queued"] == 2 and doc["telemetry"]["evicted"] == 1
