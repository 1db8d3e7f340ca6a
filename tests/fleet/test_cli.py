"""The fleet subcommands, driven through argparse like `edgeship` does."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship.common.mqtt import MqttSession, SessionSettings
from edgeship.agent.protocol import ReleaseAnnouncement, Topics, encode
from edgeship.fleet.cli import add_parsers
from edgeship.fleet.registry import Registry
from tests.fleet.helpers import make_bundle
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeship")
    add_parsers(parser.add_subparsers())
    return parser


def run(*argv: str) -> int:
    args = _parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.mark.parametrize("argv", [["keys", "--help"], ["keys", "init", "--help"],
                                  ["release", "--help"], ["fleet", "--help"],
                                  ["fleet", "serve", "--help"], ["fleet", "status", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_keys_init_release_and_announce(broker, tmp_path, capsys):
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    assert run("keys", "init", "--keys", keys, "--repo", repo) == 0
    assert run("keys", "init", "--keys", keys, "--repo", repo) == 1
    assert "already" in capsys.readouterr().err

    bundle = make_bundle(tmp_path / "b")
    db = tmp_path / "fleet.db"
    assert run("release", bundle, "--repo", repo, "--keys", keys, "--mqtt", broker.url,
               "--db", db, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"], out["version"], out["announced"]) == ("digits", 1, True)
    assert "digits/1/manifest.json" in out["targets"]

    inbox: queue.Queue = queue.Queue()
    sub = MqttSession(SessionSettings(url=broker.url, client_id="t-sub", clean_start=True),
                      on_message=inbox.put)
    sub.start([(Topics.RELEASES_FILTER, 1)])
    msg = inbox.get(timeout=10)
    sub.stop()
    assert msg.retain and ReleaseAnnouncement.from_bytes(msg.payload).version == 1
    registry = Registry(db)
    assert [r[:2] for r in registry.releases()] == [("digits", 1)]
    registry.close()

    assert run("release", bundle, "--repo", repo, "--keys", keys) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not newer than released v1" in err


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert run("keys", "init", "--keys", tmp_path / "k", "--repo", tmp_path / "r") == 0
    assert run("release", tmp_path / "nope.tar", "--repo", tmp_path / "r",
               "--keys", tmp_path / "k") == 2
    assert run("fleet", "status", "--db", tmp_path / "missing.db") == 2
    assert run("keys") == 2
    err = capsys.readouterr().err
    assert "nope.tar not found" in err and "no registry at" in err
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["keys", "init", "--keys", "k", "--repo", "r",
                              "--root-threshold", "0"])
    assert e.value.code == 2
    # TLS flags are checked before anything is signed: nothing is released
    bundle = make_bundle(tmp_path / "b")
    assert run("release", bundle, "--repo", tmp_path / "r", "--keys", tmp_path / "k",
               "--mqtt", "mqtts://127.0.0.1:1", "--tls-ca", tmp_path / "ca.pem",
               "--tls-cert", tmp_path / "c.pem") == 2
    assert run("release", bundle, "--repo", tmp_path / "r", "--keys", tmp_path / "k",
               "--mqtt", "mqtts://127.0.0.1:1", "--tls-ca", tmp_path / "ca.pem") == 2
    err = capsys.readouterr().err
    assert "--tls-cert and --tls-key go together" in err and "ca.pem: no such file" in err
    assert not (tmp_path / "r" / "targets" / "digits").exists()


def test_fleet_status_lists_devices(tmp_path, capsys):
    db = tmp_path / "fleet.db"
    registry = Registry(db)
    registry.upsert_presence("pi-1", {"online": True, "models": {"digits": {"version": 3}}})
    registry.add_event("pi-1", {"event": "installed", "model": "digits", "version": 3})
    registry.close()
    assert run("fleet", "status", "--db", db, "--json") == 0
    [dev] = json.loads(capsys.readouterr().out)
    assert (dev["id"], dev["online"], dev["last_event"]) == ("pi-1", True, "installed")
    assert run("fleet", "status", "--db", db) == 0
    out = capsys.readouterr().out
    assert "pi-1" in out and "digits:v3" in out and "installed" in out


def test_fleet_serve_records_devices_and_stops_on_sigterm(broker, tmp_path):
    keys, repo, db = tmp_path / "keys", tmp_path / "repo", tmp_path / "fleet.db"
    assert run("keys", "init", "--keys", keys, "--repo", repo) == 0
    code = ("import argparse, sys; from fleet.cli import add_parsers; "
            "p = argparse.ArgumentParser(); add_parsers(p.add_subparsers()); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", code, "fleet", "serve", "--mqtt",
                             broker.url, "--repo", str(repo), "--db", str(db)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert b"serving" in proc.stdout.readline()
        dev = MqttSession(SessionSettings(url=broker.url, client_id="t-dev", clean_start=True),
                          on_message=lambda m: None)
        dev.start()
        assert dev.wait_connected(10)

        def seen():
            dev.publish_acked(Topics.presence("pi-9"), encode("presence", {"online": True}),
                              timeout_s=5)
            registry = Registry(db)
            try:
                return registry.devices()
            finally:
                registry.close()
        wait_until(seen)
        dev.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
