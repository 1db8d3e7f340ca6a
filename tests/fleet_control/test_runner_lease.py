"""One active rollout runner per registry: two runners (two connections, as two fleet-server
processes would have) on the same SQLite file or PostgreSQL database — only the lease
holder publishes; the other takes over when the holder stops, or when it dies and its
lease expires. Both backends."""

from __future__ import annotations

import threading
import time

import pytest

from edgeship.agent.errors import ConfigError
from edgeship.fleet.registry import Registry
from edgeship.fleet.rollout import Gates, Policy
from edgeship.fleet.rollout_runner import LEASE_NAME, RolloutRunner, load, start_rollout
from tests.support import wait_until


class Published:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, int, int]] = []  # (runner, device, version, seq)

    def to(self, runner: str):
        def publish(device, desired):
            with self.lock:
                self.calls.append((runner, device, desired.version, desired.seq))
        return publish

    def by(self, runner: str) -> list[str]:
        with self.lock:
            return [c[1] for c in self.calls if c[0] == runner]


def _fleet(target) -> str:
    reg = Registry(target)
    for i in range(3):
        reg.upsert_presence(f"pi-{i}", {"online": True, "models": {"m": {"version": 1}}})
    reg.add_release("m", 1, 1.0, "test")
    reg.add_release("m", 2, 2.0, "test")
    # one wave, one download at a time: each device moves only after the previous reported
    policy = Policy(waves=(1.0,), jitter_s=0, soak_s=0, max_concurrent=1,
                    gates=Gates(min_requests=10_000))
    rollout = start_rollout(reg, model="m", version=2, policy=policy, actor="test")
    reg.close()
    return rollout.id


def _serving(target, device: str) -> None:
    reg = Registry(target)
    reg.add_event(device, {"event": "serving", "model": "m", "version": 2})
    reg.close()


def test_only_the_lease_holder_publishes_and_the_other_takes_over(registry_target):
    rid = _fleet(registry_target)
    out = Published()
    regs = [Registry(registry_target), Registry(registry_target)]
    a, b = (RolloutRunner(r, out.to(n), tick_s=0.05, lease_ttl_s=1.0, holder=n)
            for r, n in zip(regs, "ab"))
    a.tick()  # a is first: it leads
    a.start()
    b.start()
    try:
        for _ in range(40):  # both tick concurrently for ~2 s
            time.sleep(0.05)
        assert a.is_leader and not b.is_leader
        assert out.by("b") == []
        [first] = set(out.by("a"))  # max_concurrent=1: one device, published once
        assert len(out.by("a")) == 1
        _serving(registry_target, first)
        wait = time.monotonic() + 10
        while len(set(out.by("a"))) < 2 and time.monotonic() < wait:
            time.sleep(0.05)
        [second] = set(out.by("a")) - {first}
        a.stop()  # clean stop: the lease is released at once (b, ticking, may take it)
        lease = regs[0].lease(LEASE_NAME)
        assert lease is None or lease[0] == "b", lease
        _serving(registry_target, second)
        wait = time.monotonic() + 10
        while not set(out.by("b")) - {first, second} and time.monotonic() < wait:
            time.sleep(0.05)
        assert b.is_leader
        # b re-published what a had sent (same seq: devices ignore it), then moved on
        later = set(out.by("b")) - {first, second}
        assert len(later) == 1, out.calls
        seqs = {(d, s) for _, d, _, s in out.calls}
        assert len({d for d, _ in seqs}) == len(seqs) == 3  # one seq per device, ever
        # the runner saves the rollout after it publishes: wait for that save
        wait_until(lambda: set(load(regs[1], rid).sent) == {"pi-0", "pi-1", "pi-2"},
                   timeout_s=10, what="b to record what it sent")
        log = [e for e in regs[1].audit_log() if e["action"] == "runner.lead"]
        assert [e["holder"] for e in log] == ["a", "b"]
    finally:
        a.stop()
        b.stop()
        for r in regs:
            r.close()


def test_a_dead_holders_lease_expires_and_another_runner_takes_over(registry_target):
    _fleet(registry_target)
    out = Published()
    regs = [Registry(registry_target), Registry(registry_target)]
    # a lease long enough that a's first tick (which publishes and saves) cannot outlast it
    # on a loaded machine before b looks
    a = RolloutRunner(regs[0], out.to("a"), tick_s=0.05, lease_ttl_s=3.0, holder="a")
    b = RolloutRunner(regs[1], out.to("b"), tick_s=0.05, lease_ttl_s=3.0, holder="b")
    try:
        a.tick()  # a leads, then "dies": it never renews nor releases
        assert a.is_leader and len(out.by("a")) == 1
        b.tick()
        assert not b.is_leader and out.by("b") == []  # still a's until it expires
        time.sleep(3.2)
        b.tick()
        assert b.is_leader and out.by("b") == out.by("a")  # re-published, same seq
        a.tick()  # a comes back: the lease is b's now, a does nothing
        assert not a.is_leader and len(out.by("a")) == 1
        assert regs[0].lease(LEASE_NAME)[0] == "b"
    finally:
        for r in regs:
            r.close()


def test_lease_must_outlast_two_ticks(tmp_path):
    reg = Registry(tmp_path / "f.db")
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        RolloutRunner(reg, lambda d, s: None, tick_s=1.0, lease_ttl_s=1.5)
    reg.close()


def test_two_fleet_servers_on_one_registry_only_one_drives_the_rollout(broker, tmp_path):
    """The same with two FleetServers (their own registry connection and MQTT session, as
    two processes would have) publishing real desired state through Mosquitto."""
    from edgeship.common.mqtt import MqttSession, SessionSettings
    from edgeship.agent.protocol import DesiredState, TOPIC_ROOT
    from edgeship.fleet.server import FleetServer, FleetSettings
    from edgeship.fleet.tuf_repo import init_repository
    init_repository(tmp_path / "keys", tmp_path / "repo")
    db = tmp_path / "fleet.db"
    rid = _fleet(db)
    got: list[tuple[str, int]] = []
    lock = threading.Lock()

    def on_message(msg):
        if msg.payload:
            with lock:
                got.append((msg.topic.split("/")[3], DesiredState.from_bytes(msg.payload).seq))
    watch = MqttSession(SessionSettings(url=broker.url, client_id="watch-desired",
                                        clean_start=True, session_expiry_s=0), on_message)
    watch.start([(f"{TOPIC_ROOT}/dev/+/desired", 1)])
    assert watch.wait_subscribed(10)
    servers = [FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=tmp_path / "repo",
                                         db_path=db, rollout_tick_s=0.1,
                                         client_id=f"fleet-{i}")) for i in range(2)]
    try:
        for s in servers:
            s.start()

        def devices_told(n):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with lock:
                    if len({d for d, _ in got}) >= n:
                        return sorted({d for d, _ in got})
                time.sleep(0.05)
            raise AssertionError(f"{n} device(s) not told; got {got}")
        [first] = devices_told(1)
        time.sleep(1.0)  # both runners keep ticking
        [leader] = [s for s in servers if s.rollouts.is_leader]
        [other] = [s for s in servers if s is not leader]
        with lock:
            assert got == [(first, got[0][1])]  # one command, published once
        leader.stop()
        servers.remove(leader)
        _serving(db, first)
        devices_told(2)
        assert other.rollouts.is_leader
        with lock:
            seqs = {}
            for device, seq in got:
                seqs.setdefault(device, set()).add(seq)
        assert all(len(s) == 1 for s in seqs.values())  # re-published: the same seq
        reg = Registry(db)
        told = [e["devices"] for e in reg.audit_log(rid) if e["action"] == "rollout.desired"]
        assert sorted(sum(told, [])) == sorted(seqs)  # each device decided once, by one
        assert [e["holder"] for e in reg.audit_log() if e["action"] == "runner.lead"] == \
            [leader.rollouts.holder, other.rollouts.holder]
        reg.close()
    finally:
        for s in servers:
            s.stop()
        watch.stop()
