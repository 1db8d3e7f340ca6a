"""The SQLite registry, without MQTT."""

from __future__ import annotations

import itertools
import threading

from edgeship.fleet.registry import Registry, RegistrySettings


def _registry(tmp_path, **kw):
    clock = itertools.count(1000.0)
    return Registry(tmp_path / "fleet.db", RegistrySettings(**kw), clock=lambda: next(clock))


def test_presence_status_and_telemetry_are_recorded(tmp_path):
    reg = _registry(tmp_path)
    reg.upsert_presence("pi-1", {"online": True, "profile": "rpi4", "agent_version": "0.1",
                                 "models": {"digits": {"version": 2}}})
    reg.add_event("pi-1", {"event": "installed", "model": "digits", "version": 2})
    reg.add_event("pi-1", {"event": "rejected", "model": "digits", "version": 3,
                           "reason": "bad_signature", "detail": "x" * 5000})
    reg.add_telemetry("pi-1", {"latency_ms": 3.5})
    reg.add_telemetry("pi-1", {"latency_ms": 4.0})
    reg.upsert_presence("pi-1", {"online": False})  # offline will: keeps what we knew

    [dev] = reg.devices()
    assert (dev.id, dev.online, dev.profile, dev.agent_version) == ("pi-1", False, "rpi4", "0.1")
    assert dev.models == {"digits": {"version": 2}}
    assert (dev.last_event, dev.last_seen) == ("rejected", 1005.0)
    events = reg.events("pi-1")
    assert [(e.event, e.version, e.reason) for e in events] == [
        ("installed", 2, None), ("rejected", 3, "bad_signature")]
    assert len(events[1].detail) == 1024 and len(events[1].raw["detail"]) == 5000
    assert [e.event for e in reg.events(since=1002.0)] == ["rejected"]
    assert reg.events("other") == []
    assert reg.latest_telemetry("pi-1") == {"latency_ms": 4.0}
    assert reg.latest_telemetry("other") is None
    reg.close()


def test_status_from_an_unknown_device_creates_it_and_releases_are_kept(tmp_path):
    reg = _registry(tmp_path)
    reg.add_event("jetson-1", {"event": "downloading"})
    reg.add_release("digits", 1, 123.0, "cli")
    [dev] = reg.devices()
    assert (dev.id, dev.online, dev.models) == ("jetson-1", False, None)
    assert reg.releases() == [("digits", 1, 123.0, "cli")]
    reg.close()


def test_tables_are_pruned_to_their_bound(tmp_path):
    reg = _registry(tmp_path, max_event_rows=10, max_telemetry_rows=5, prune_every=20)
    for i in range(40):
        reg.add_event("d", {"event": f"e{i}"})
        reg.add_telemetry("d", {"i": i})
    events = reg.events("d")
    assert [e.event for e in events] == [f"e{i}" for i in range(30, 40)]
    assert reg.latest_telemetry("d") == {"i": 39}
    reg.close()


def test_concurrent_writers_and_a_second_reader(tmp_path):
    reg = _registry(tmp_path)
    threads = [threading.Thread(target=lambda n=n: [reg.add_telemetry(f"d{n}", {"i": i})
                                                    for i in range(50)]) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = Registry(tmp_path / "fleet.db")
    assert sorted(d.id for d in reader.devices()) == ["d0", "d1", "d2", "d3"]
    reader.close()
    reg.close()
