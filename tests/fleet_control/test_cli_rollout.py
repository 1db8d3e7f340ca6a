"""`edgeship devices ls|tag` and `edgeship rollout …` against a registry file, --json."""

from __future__ import annotations

import json

from edgeship.cli import build_parser
from edgeship.fleet.registry import Registry


def run(*argv) -> int:
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def _out(capsys):
    return json.loads(capsys.readouterr().out)


def _registry(db, devices: int) -> Registry:
    """``devices`` online devices pi-0 … serving m v1, and m v2 released."""
    reg = Registry(db)
    for i in range(devices):
        reg.upsert_presence(f"pi-{i}", {"online": True, "models": {"m": {"version": 1}}})
    reg.add_release("m", 2, 0.0, "test")
    return reg


def test_devices_and_rollout_commands(tmp_path, capsys):
    db = tmp_path / "fleet.db"
    _registry(db, 4).close()
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


def test_all_or_none_status_shows_the_phase_held_devices_and_the_runner(tmp_path, capsys):
    from edgeship.fleet.rollout_runner import RolloutRunner
    db = tmp_path / "fleet.db"
    reg = _registry(db, 3)
    assert run("rollout", "start", "m", "2", "--all-or-none", "--jitter-s", "0",
               "--db", db, "--json") == 0
    rid = _out(capsys)["id"]
    sent = []
    runner = RolloutRunner(reg, lambda d, s: sent.append(s), holder="fleet-a")
    runner.tick()
    assert {s.hold for s in sent} == {True} and len(sent) == 3
    reg.add_event("pi-1", {"event": "held", "model": "m", "version": 2})
    runner.tick()
    assert run("rollout", "status", rid, "--db", db, "--json") == 0
    doc = _out(capsys)
    assert doc["phase"] == "staging" and doc["waves"][0]["held"] == 1
    assert doc["runner"]["holder"] == "fleet-a"
    assert run("rollout", "status", rid, "--db", db) == 0
    text = capsys.readouterr().out
    assert "all-or-none: staging (1/3 held" in text and "runner: fleet-a" in text
    for d in ("pi-0", "pi-2"):
        reg.add_event(d, {"event": "held", "model": "m", "version": 2})
    runner.tick()  # all held: the commit goes to all three at once
    assert [s.hold for s in sent[3:]] == [False] * 3
    assert run("rollout", "status", rid, "--db", db, "--json") == 0
    assert _out(capsys)["phase"] == "committed"
    reg.close()
