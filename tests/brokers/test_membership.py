"""Which fleet server answers which device without shared subscriptions (pure rules, then
two servers on one registry), and what a device coming online is re-sent."""

from __future__ import annotations

from edgeship.agent.protocol import DesiredState, ReleaseAnnouncement, Topics
from edgeship.fleet.catch_up import Arrivals, catch_up, running_versions
from edgeship.fleet.membership import Member, Membership, MembershipSettings, live_members, owner
from edgeship.fleet.registry import DesiredRecord, Registry

DEVICES = [f"pi-{i:03d}" for i in range(300)]


def test_owner_spreads_devices_and_a_leaver_moves_only_its_own():
    three = ["fleet-a", "fleet-b", "fleet-c"]
    before = {d: owner(d, three) for d in DEVICES}
    counts = {m: list(before.values()).count(m) for m in three}
    assert all(60 <= n <= 140 for n in counts.values()), counts  # roughly a third each
    after = {d: owner(d, ["fleet-a", "fleet-c"]) for d in DEVICES}
    moved = [d for d in DEVICES if before[d] != after[d]]
    assert moved and all(before[d] == "fleet-b" for d in moved)
    assert owner("pi-001", []) is None


def test_live_members_count_from_settle_until_leave_or_expiry():
    rows = [Member("a", since=0, until=None, expires_at=100),
            Member("b", since=10, until=30, expires_at=100),
            Member("c", since=20, until=None, expires_at=25)]
    settle = 3
    assert live_members(rows, 1, settle) == ["a"]  # nobody settled: the first to join
    assert live_members(rows, 12, settle) == ["a"]  # b joined, not settled yet
    assert live_members(rows, 13, settle) == ["a", "b"]
    assert live_members(rows, 24, settle) == ["a", "b", "c"]
    assert live_members(rows, 25, settle) == ["a", "b"]  # c stopped renewing: expired
    assert live_members(rows, 30, settle) == ["a"]  # b's announced leave
    late_first = [Member("z", 5, None, 100), Member("y", 6, None, 100)]
    assert live_members(late_first, 6.5, settle) == ["z"]  # a later joiner never wins


def test_two_servers_on_one_registry_agree_on_every_device_at_every_moment(tmp_path):
    """Each server reads the registry on its own schedule (every refresh_s, out of step);
    at every instant exactly one of them owns each device: no double answers, no gaps."""
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    settings = MembershipSettings(refresh_s=1.0, settle_s=3.0, ttl_s=10.0)
    regs = [Registry(tmp_path / "fleet.db", clock=clock) for _ in range(2)]
    a = Membership(regs[0], "fleet-a", settings, clock=clock)
    b = Membership(regs[1], "fleet-b", settings, clock=clock)
    a.registry.join_member("fleet-a", settings.ttl_s)
    a.refresh()
    leave_at = None
    for step in range(200):  # 20 s in 0.1 s steps
        now[0] = 1000.0 + step * 0.1
        if step == 5:
            b.registry.join_member("fleet-b", settings.ttl_s)
            b.refresh()
        if step == 120:
            leave_at = a.leave()
        for i, m in enumerate((a, b)):
            if step % 10 == (0 if i == 0 else 7):  # out of step, every refresh_s
                m.registry.renew_member(m.id, settings.ttl_s)
                m.refresh()
        serving = [m for m in (a, b) if leave_at is None or m is b or now[0] < leave_at]
        for d in DEVICES[:50]:
            owners = [m.id for m in serving if m.owns(d)]
            assert len(owners) == 1, (now[0], d, owners)
    assert b.live() == ["fleet-b"] and a.live() == ["fleet-b"]


def test_catch_up_resends_desired_state_and_only_the_announcements_missing():
    desired = [DesiredRecord("pi-1", "gated", 4, seq=9, rollout="r1", updated_at=0)]
    announcements = [("gated", 5, 1.0, 0.0), ("plain", 2, 2.0, 60.0), ("served", 3, 3.0, 0.0)]
    running = running_versions({"models": {"served": {"version": 3}, "plain": {"version": 1}}})
    out = catch_up("pi-1", running, desired, announcements)
    assert [(o.topic, o.retain) for o in out] == [(Topics.desired("pi-1"), True),
                                                  (Topics.device_release("pi-1", "plain"),
                                                   False)]
    assert DesiredState.from_bytes(out[0].payload) == DesiredState("gated", 4, 9, "r1")
    ann = ReleaseAnnouncement.from_bytes(out[1].payload)
    assert (ann.model, ann.version, ann.spread_s) == ("plain", 2, 60.0)
    assert catch_up("pi-1", {"plain": 2, "served": 3}, [], announcements[1:]) == []


def test_a_device_is_caught_up_once_per_connection():
    arrivals = Arrivals(max_devices=2)
    first = {"connected_at": 100.0}
    assert arrivals.is_new("pi-1", first, online=True, retained=False)
    assert not arrivals.is_new("pi-1", first, online=True, retained=False)  # same connection
    assert not arrivals.is_new("pi-1", {"connected_at": 200.0}, online=False, retained=False)
    assert not arrivals.is_new("pi-1", {"connected_at": 200.0}, online=True, retained=True)
    assert arrivals.is_new("pi-1", {"connected_at": 200.0}, online=True, retained=False)
    assert arrivals.is_new("old-agent", {}, online=True, retained=False)  # no connected_at:
    assert arrivals.is_new("old-agent", {}, online=True, retained=False)  # every time
    arrivals.is_new("pi-2", first, online=True, retained=False)
    arrivals.is_new("pi-3", first, online=True, retained=False)  # pi-1 forgotten (oldest)
    assert arrivals.is_new("pi-1", {"connected_at": 200.0}, online=True, retained=False)


def test_announcements_keep_the_newest_version(tmp_path):
    reg = Registry(tmp_path / "fleet.db")
    reg.note_announcement("m", 3, 30.0, 0)
    reg.note_announcement("m", 2, 20.0, 0)  # a late retained replay of an older one
    reg.note_announcement("n", 1, 10.0, 5.0)
    assert reg.announcements() == [("m", 3, 30.0, 0.0), ("n", 1, 10.0, 5.0)]
