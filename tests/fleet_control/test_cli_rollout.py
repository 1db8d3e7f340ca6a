"""`edgeship devices ls|tag` and `edgeship rollout …` against a registry file, --json."""

from __future__ import annotations

import json

from edgeship.cli import build_parser
from fleet.registry import Registry


def run(*argv) -> int:
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def _out(capsys):
    return json.loads(capsys.readouterr().out)


def test_devices_and_rollout_commands(tmp_path, capsys):
    db = tmp_path / "fleet.db"
    reg = Registry(db)
    for i in range(4):
        reg.upsert_presence(f"pi-{i}", {"online": True, "models": {"m": {"version": 1}}})
    reg.add_release("m", 2, 0.0, "test")
    reg.close()
    assert run("devices", "tag", "pi-0", "pi-1", "--add", "lab", "--group", "north",
               "--db", db, "--json", "--by", "alice") == 0
    assert [d["group"] for d in _out(capsys)] == ["north", "north"]
    assert run("devices", "ls", "--db", db, "--tag", "lab", "--json") == 0
    assert [d["id"] for d in _out(capsys)] == ["pi-0", "pi-1"]
    assert run("devices", "ls", "--db", db) == 0
    assert "pi-3" in capsys.readouterr().out
    assert run("rollout", "start", "m", "2", "--group", "north", "--waves", "50,100",
               "--db", db, "--json", "--by", "alice") == 0
    started = _out(capsys)
    assert started["state"] == "running" and [w["devices"] for w in started["waves"]] == [1, 1]
    rid = started["id"]
    assert run("rollout", "pause", rid, "--db", db, "--reason", "lunch", "--json") == 0
    assert _out(capsys)["state"] == "paused"
    assert run("rollout", "pause", rid, "--db", db) == 2  # not running: bad input
    assert "cannot pause a rollout that is paused" in capsys.readouterr().err
    assert run("rollout", "status", rid, "--db", db, "--json") == 0
    doc = _out(capsys)
    assert doc["reason"] == "lunch"
    assert [e["action"] for e in doc["audit"]] == ["rollout.start", "rollout.pause"]
    assert run("rollout", "status", "--db", db) == 0
    assert rid in capsys.readouterr().out
    assert run("rollout", "abort", rid, "--db", db) == 0
    assert run("rollout", "start", "m", "7", "--db", db) == 2
    assert "never released" in capsys.readouterr().err
    assert run("rollout", "status", "nope", "--db", db) == 2
    assert run("devices", "ls", "--db", tmp_path / "missing.db") == 2
    assert run("fleet", "status", "--db", db, "--json") == 0
    assert {d["id"]: d["group"] for d in _out(capsys)}["pi-0"] == "north"
