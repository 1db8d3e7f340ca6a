"""Flooding a device with model names (an open broker: anyone can announce): an
announcement for a model the device does not have creates nothing — no record, no model
directory, no telemetry entry — until signed metadata confirms that model and version; a
real update does not wait behind the flood; telemetry stays small enough for the fleet to
keep it; and even signed models are bounded per device."""

from __future__ import annotations

import json
import time

from edgeship.agent.protocol import ReleaseAnnouncement, Topics
from tests.delivery.helpers import start_agent
from tests.support import models, wait_until
from tests.support.loop_env import Fleet

FAKES = 300


def test_fake_announcements_create_nothing_and_do_not_delay_a_real_update(loop_env,
                                                                          tmp_path):
    fleet = Fleet(loop_env, tmp_path)
    agent = loop_env.start_agent("dev")
    fleet.release("m", 1, models.good(1))
    loop_env.wait_serving("dev", 1)
    mark = len(loop_env.watcher.events)
    for i in range(FAKES):
        loop_env.publish(Topics.release(f"fake-{i}"),
                         ReleaseAnnouncement(f"fake-{i}", 1, time.time()).to_bytes(),
                         retain=True)
    fleet.release("m", 2, models.good(2))
    loop_env.wait_serving("dev", 2, timeout_s=60)
    registry = loop_env.fleet.registry

    def counted() -> dict | None:  # the agent has looked at every fake announcement
        t = registry.latest_telemetry("dev") or {}
        seen = t.get("announcements", {})
        return t if seen.get("unconfirmed", 0) + seen.get("dropped", 0) >= FAKES else None

    latest = wait_until(counted, 60, "the agent to count the fake announcements")
    state = agent.cfg.state_dir
    assert sorted(p.name for p in (state / "models").iterdir()) == ["m"]
    assert sorted(p.stem for p in (state / "updates").glob("*.json")) == ["m"]
    about_fakes = [e for e in loop_env.watcher.events[mark:]
                   if str(e.get("model", "")).startswith("fake-")]
    assert about_fakes == []
    assert len(json.dumps(latest)) < 8 * 1024, len(json.dumps(latest))
    assert loop_env.fleet.stats.snapshot()["malformed"] == 0


def test_a_device_keeps_a_bounded_number_of_models(loop_env, tmp_path):
    fleet = Fleet(loop_env, tmp_path)
    start_agent(loop_env, "dev", max_models=2)
    for name in ("a", "b"):
        fleet.release(name, 1, models.good(1))
        loop_env.watcher.wait_for(lambda e: e.get("device") == "dev" and
                                  e.get("model") == name and e.get("event") == "serving")
    fleet.release("c", 1, models.good(1))
    ev = loop_env.watcher.wait_for(lambda e: e.get("device") == "dev" and
                                   e.get("model") == "c" and e.get("event") == "rejected")
    assert ev["reason"] == "too_many_models"
    state = loop_env.root / "devices" / "dev"
    assert sorted(p.name for p in (state / "models").iterdir()) == ["a", "b"]
