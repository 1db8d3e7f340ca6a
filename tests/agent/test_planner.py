"""The planner that decides what a device installs next, driven with a fake desired state
and plain numbers: no process, broker, thread or disk."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeship.agent.errors import Reason
from edgeship.agent.protocol import DesiredState, ReleaseAnnouncement, spread_delay_s
from edgeship.agent.update.planner import DeviceView, Do, Planner, Step


@dataclass
class FakeDesired:
    """What the fleet last asked this device, per model: (version, hold)."""

    asked: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def set(self, d: DesiredState) -> None:
        self.asked[d.model] = (d.version, d.hold)

    def version(self, model: str) -> int | None:
        return self.asked[model][0] if model in self.asked else None

    def holds(self, model: str) -> bool:
        return model in self.asked and self.asked[model][1]

    def governs(self, model: str) -> bool:
        return model in self.asked


def _planner() -> tuple[Planner, FakeDesired]:
    desired = FakeDesired()
    return Planner("dev-1", desired), desired


def test_the_newest_announcement_wins_and_supersedes_a_running_trial():
    p, _ = _planner()
    assert p.announced(ReleaseAnnouncement("m", 3, 100.0), now=100.0, monotonic=5.0)
    assert not p.announced(ReleaseAnnouncement("m", 2, 100.0), now=100.0, monotonic=5.0)
    assert p.wanted == {"m": 3}
    assert p.superseded("m", 2) and not p.superseded("m", 3)
    assert p.pop() == ("m", 3) and p.pop() is None


def test_an_announcement_waits_out_the_devices_own_offset_in_the_spread():
    p, _ = _planner()
    ann = ReleaseAnnouncement("m", 4, released_at=1000.0, spread_s=600.0)
    p.announced(ann, now=1000.0, monotonic=50.0)
    offset = spread_delay_s("dev-1", "m", 4, 600.0, 1000.0, 1000.0)
    assert 0 < offset < 600
    assert p.spread_wait_s("m", monotonic=50.0) == offset
    assert p.spread_wait_s("m", monotonic=50.0) == 0  # waited once, not again
    p.announced(ann, now=1000.0 + 600, monotonic=650.0)  # heard late: no wait at all
    assert p.spread_wait_s("m", monotonic=650.0) == 0


def test_a_newer_announcement_or_a_rollout_during_the_wait_skips_the_version():
    p, desired = _planner()
    p.announced(ReleaseAnnouncement("m", 4, 0.0), now=0.0, monotonic=0.0)
    p.pop()
    assert p.still_wanted("m", 4)
    p.want("m", 5)
    assert not p.still_wanted("m", 4)
    p.pop()
    desired.set(DesiredState("m", 4, seq=1))
    assert not p.still_wanted("m", 5)


def test_announcements_are_stale_blocked_or_retried_a_bounded_number_of_times():
    p, _ = _planner()
    assert p.plan("m", 2, DeviceView(active=3)) == [
        Step(Do.REJECT, 2, Reason.STALE_ANNOUNCEMENT, "v3 is installed")]
    assert p.plan("m", 3, DeviceView(active=3)) == []
    [blocked] = p.plan("m", 4, DeviceView(active=3, blocked=(4,)))
    assert blocked.do == Do.REJECT and blocked.reason == "version_blocked"
    assert [p.plan("m", 5, DeviceView(active=3)) for _ in range(4)] == \
        [[Step(Do.INSTALL, 5)]] * 3 + [[]]


def test_a_desired_state_governs_its_model_and_ignores_announcements():
    p, desired = _planner()
    desired.set(DesiredState("m", 2, seq=1))
    assert not p.announced(ReleaseAnnouncement("m", 9, 0.0), now=0.0, monotonic=0.0)
    assert p.want("m", 2) and p.plan("m", 9, DeviceView(active=1)) == [Step(Do.INSTALL, 2)]
    assert p.spread_wait_s("m", monotonic=0.0) == 0
    # any other version the fleet asked for ends the running trial, older ones too
    p.want("m", 1, exact=True)
    assert p.superseded("m", 2)


def test_hold_stages_then_the_commit_switches_and_the_old_version_discards():
    p, desired = _planner()
    desired.set(DesiredState("m", 3, seq=1, hold=True))
    assert p.plan("m", 3, DeviceView(active=2, kept=(2,))) == [Step(Do.STAGE, 3)]
    desired.set(DesiredState("m", 3, seq=2))
    assert p.plan("m", 3, DeviceView(active=2, held=3, kept=(2, 3))) == [Step(Do.COMMIT, 3)]
    desired.set(DesiredState("m", 2, seq=3))  # the rollout rolled back instead
    assert p.plan("m", 2, DeviceView(active=2, held=3, kept=(2, 3))) == [
        Step(Do.DISCARD, 3)]


def test_going_back_to_an_older_version_reverts_to_the_kept_copy_else_installs():
    p, desired = _planner()
    desired.set(DesiredState("m", 1, seq=5))
    assert p.plan("m", 1, DeviceView(active=2, kept=(1, 2))) == [Step(Do.REVERT, 1)]
    assert p.plan("m", 1, DeviceView(active=2, kept=(2,))) == [Step(Do.INSTALL, 1)]
    assert p.plan("m", 1, DeviceView(active=1, kept=(1, 2))) == []
    # a held version that is not the one asked for is dropped first
    assert p.plan("m", 1, DeviceView(active=2, held=3, kept=(1, 2, 3))) == [
        Step(Do.DISCARD, 3), Step(Do.REVERT, 1)]


def test_a_catch_up_re_send_is_dealt_with_when_served_newer_or_reverted_before():
    dealt_with = Planner.dealt_with
    assert dealt_with(3, DeviceView(active=3)) and dealt_with(2, DeviceView(active=3))
    assert dealt_with(4, DeviceView(active=3, blocked=(4,)))
    assert not dealt_with(4, DeviceView(active=3))
    assert not dealt_with(1, DeviceView())
