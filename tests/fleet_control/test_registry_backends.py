"""The registry runs the same schema and queries on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import itertools

from edgeship.fleet.registry import Registry, RegistrySettings


def _reg(target):
    clock = itertools.count(1000.0)
    return Registry(target, RegistrySettings(), clock=lambda: next(clock))


def _telemetry(version: int, p50: float, requests: int = 10, errors: int = 0) -> dict:
    return {"models": {"digits": {"version": version, "requests": requests, "errors": errors,
                                  "latency_ms": {"p50": p50, "p95": p50 * 2}}}}


def test_inventory_tags_groups_and_reports(registry_target):
    reg = _reg(registry_target)
    reg.upsert_presence("pi-1", {"online": True, "profile": "rpi4", "agent_version": "0.1",
                                 "arch": "aarch64", "models": {"digits": {"version": 1}}})
    reg.upsert_presence("pi-2", {"online": True, "profile": "rpi5", "models": {}})
    reg.tag("pi-1", add=["lab", "canary"])
    reg.tag("pi-1", remove=["lab"])
    reg.set_group("pi-1", "north")
    reg.set_group("pi-2", "south")
    [north] = reg.devices(group="north")
    assert (north.id, north.arch, north.tags, north.running("digits")) == \
        ("pi-1", "aarch64", ("canary",), 1)
    assert [d.id for d in reg.devices(tag="canary")] == ["pi-1"]
    assert [d.id for d in reg.devices()] == ["pi-1", "pi-2"]
    reg.add_event("pi-1", {"event": "failed", "model": "digits", "version": 2,
                           "reason": "health_check_failed"})
    assert reg.install_outcomes("digits", 2, since=0) == \
        {"pi-1": ("failed", "health_check_failed")}
    reg.add_release("digits", 2, 5.0, "cli")
    reg.add_release("digits", 2, 6.0, "ci")  # re-release replaces
    assert reg.releases("digits") == [("digits", 2, 6.0, "ci")]
    reg.close()


def test_desired_state_is_versioned_and_idempotent(registry_target):
    reg = _reg(registry_target)
    reg.upsert_presence("pi-1", {"online": True})
    first, changed = reg.set_desired("pi-1", "digits", 2, rollout="r1")
    assert changed and first.seq == 1
    again, changed = reg.set_desired("pi-1", "digits", 2, rollout="r1")
    assert not changed and again.seq == 1  # redelivered command: same seq
    other, _ = reg.set_desired("pi-2", "digits", 2)
    back, changed = reg.set_desired("pi-1", "digits", 1, rollout="r1")
    assert changed and back.seq > other.seq > first.seq
    assert [(d.device, d.version) for d in reg.desired(model="digits")] == \
        [("pi-1", 1), ("pi-2", 2)]
    [pi1] = [d for d in reg.devices() if d.id == "pi-1"]
    assert pi1.desired == {"digits": 1}
    reg.close()


def test_a_device_that_rolls_back_on_its_own_shows_what_it_runs(registry_target):
    reg = _reg(registry_target)
    reg.upsert_presence("pi-1", {"online": True, "models": {"digits": {"version": 1}}})
    reg.set_desired("pi-1", "digits", 2)
    reg.add_event("pi-1", {"event": "serving", "model": "digits", "version": 2})
    assert reg.devices()[0].running("digits") == 2
    # the new version failed on the device; it went back to v1 and says so
    reg.add_event("pi-1", {"event": "failed", "model": "digits", "version": 2,
                           "reason": "health_check_failed"})
    reg.upsert_presence("pi-1", {"online": True, "models": {"digits": {"version": 1}}})
    [dev] = reg.devices()
    assert dev.running("digits") == 1 and dev.desired == {"digits": 2}
    reg.close()


def test_serving_stats_per_version_and_device(registry_target):
    reg = _reg(registry_target)
    reg.add_telemetry("pi-1", _telemetry(1, 2.0, requests=10))
    reg.add_telemetry("pi-1", _telemetry(1, 4.0, requests=30, errors=3))
    reg.add_telemetry("pi-1", _telemetry(2, 9.0, requests=5))
    reg.add_telemetry("pi-2", {"models": {"digits": {"version": 1, "requests": 0,
                                                     "latency_ms": {"p50": None}}}})
    stats = reg.version_stats("digits", 1, since=0)
    assert stats["pi-1"].requests == 40 and stats["pi-1"].errors == 3
    assert abs(stats["pi-1"].p50_ms - 3.5) < 1e-9  # request-weighted
    assert stats["pi-1"].error_rate == 3 / 40
    assert stats["pi-2"].p50_ms is None and stats["pi-2"].error_rate is None
    assert reg.version_stats("digits", 2, since=0)["pi-1"].p50_ms == 9.0
    assert reg.version_stats("digits", 2, since=10_000) == {}
    series = reg.version_series("digits", since=0, bucket_s=1000)
    assert {s["version"] for s in series} == {1, 2}
    assert sum(s["requests"] for s in series if s["version"] == 1) == 40
    reg.close()


def test_rollouts_and_audit_log(registry_target):
    reg = _reg(registry_target)
    reg.save_rollout("r1", "digits", "running", {"id": "r1", "state": "running"})
    reg.save_rollout("r1", "digits", "paused", {"id": "r1", "state": "paused"})
    reg.save_rollout("r2", "digits", "done", {"id": "r2", "state": "done"})
    assert reg.rollout("r1")["state"] == "paused"
    assert [r["id"] for r in reg.rollouts(["paused", "running"])] == ["r1"]
    assert reg.rollout("nope") is None
    reg.audit("alice", "rollout.start", "r1", devices=["pi-1"])
    reg.audit("fleet", "rollout.halt", "r1", reason="latency")
    reg.audit("bob", "devices.tag", None, device="pi-9")
    log = reg.audit_log("r1")
    assert [(e["actor"], e["action"]) for e in log] == [("alice", "rollout.start"),
                                                        ("fleet", "rollout.halt")]
    assert log[0]["devices"] == ["pi-1"] and log[1]["reason"] == "latency"
    assert len(reg.audit_log()) == 3
    assert reg.backend in ("sqlite", "postgresql")
    reg.close()


def test_reports_are_stored_in_batches_and_a_bad_one_loses_only_itself(registry_target):
    reg = _reg(registry_target)
    batch = [("presence", "pi-1", {"online": True, "profile": "rpi4",
                                   "models": {"digits": {"version": 1}}}),
             ("status", "pi-1", {"event": "failed", "model": "digits", "version": 2,
                                 "reason": "disk_full"}),
             ("telemetry", "pi-1", {"system": {"cpu_percent": 40.0, "temperature_c": 61.5,
                                               "memory": {"used_percent": 33.0}}}),
             ("status", "pi-2", {"event": "serving", "model": "digits", "version": 2})]
    assert reg.add_reports(batch) == 4
    pi1, pi2 = reg.devices()
    assert (pi1.profile, pi1.last_failure, pi1.cpu_percent, pi1.temperature_c,
            pi1.memory_percent) == ("rpi4", "disk_full", 40.0, 61.5, 33.0)
    assert pi2.running("digits") == 2
    bad = [("status", "pi-3", {"event": "serving", "model": "digits", "version": 3}),
           ("status", "pi-4", {"event": "x", "version": 2 ** 70}),  # stored, version None
           ("gossip", "pi-6", {}),  # not a report kind: the batch is retried one by one
           ("presence", "pi-5", {"online": True})]
    assert reg.add_reports(bad) == 3
    assert [d.id for d in reg.devices()] == ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5"]
    assert reg.events("pi-4")[0].version is None
    reg.close()


def test_fleet_members_and_announcements(registry_target):
    """The rows fleet servers coordinate through without shared subscriptions
    (fleet.membership) and the announcements re-sent to devices coming online."""
    reg = _reg(registry_target)
    since = reg.join_member("fleet-a", ttl_s=10)
    assert reg.renew_member("fleet-a", ttl_s=10) and not reg.renew_member("ghost", ttl_s=10)
    reg.leave_member("fleet-a", since + 3)
    [(member, joined, leaves_at, expires_at)] = reg.members()
    assert (member, joined, leaves_at) == ("fleet-a", since, since + 3) and expires_at > since
    reg.join_member("fleet-a", ttl_s=10)  # a restart under the same id clears the leave
    assert reg.members()[0][2] is None
    reg.note_announcement("digits", 2, 5.0, 60.0)
    reg.note_announcement("digits", 1, 4.0)
    assert reg.announcements() == [("digits", 2, 5.0, 60.0)]
