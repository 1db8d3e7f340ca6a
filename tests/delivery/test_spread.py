"""Announcement spread (issue 3): an announcement may carry ``spread_s``; each device starts
its fetch at its own deterministic offset in that window. Absent or 0 = at once."""

from __future__ import annotations

import time

import pytest

from edgeship.agent.errors import ProtocolError
from edgeship.agent.protocol import (MAX_SPREAD_S, ReleaseAnnouncement, Topics, decode,
                            spread_delay_s)
from tests.delivery.helpers import start_agent, wait_event


def test_offsets_are_deterministic_per_device_and_release_and_fill_the_window():
    offsets = [spread_delay_s(f"dev-{i}", "digits", 2, 60.0, 1000.0, 1000.0)
               for i in range(400)]
    assert offsets == [spread_delay_s(f"dev-{i}", "digits", 2, 60.0, 1000.0, 1000.0)
                       for i in range(400)]  # same after a restart
    assert all(0 <= o < 60.0 for o in offsets)
    assert min(offsets) < 3 and max(offsets) > 57  # spread over the whole window
    assert len({round(o, 6) for o in offsets}) == len(offsets)  # not in one instant
    by_version = [spread_delay_s(f"dev-{i}", "digits", 3, 60.0, 1000.0, 1000.0)
                  for i in range(400)]
    assert by_version != offsets  # a new release reshuffles who goes first


def test_zero_spread_is_immediate_and_late_or_skewed_devices_wait_at_most_their_offset():
    assert spread_delay_s("dev-1", "digits", 2, 0.0, 1000.0, 1000.0) == 0.0
    offset = spread_delay_s("dev-1", "digits", 2, 60.0, 1000.0, 1000.0)
    assert offset > 0
    # heard of it 10 s after the release: waits only what is left of its offset
    assert spread_delay_s("dev-1", "digits", 2, 60.0, 1000.0, 1010.0) == \
        pytest.approx(max(0.0, offset - 10))
    assert spread_delay_s("dev-1", "digits", 2, 60.0, 1000.0, 5000.0) == 0.0  # was offline
    # device clock an hour behind: never more than its own offset
    assert spread_delay_s("dev-1", "digits", 2, 60.0, 1000.0, 1000.0 - 3600) == \
        pytest.approx(offset)


def test_announcement_spread_field_is_optional_and_validated():
    plain = ReleaseAnnouncement("digits", 2, 1.0)
    assert "spread_s" not in decode(plain.to_bytes())  # old agents see the old message
    assert ReleaseAnnouncement.from_bytes(plain.to_bytes()).spread_s == 0.0
    spread = ReleaseAnnouncement("digits", 2, 1.0, spread_s=300.0)
    assert ReleaseAnnouncement.from_bytes(spread.to_bytes()) == spread
    for bad in (-1, True, "60", MAX_SPREAD_S + 1):
        payload = (b'{"kind":"release","model":"digits","released_at":1.0,"schema":1,'
                   b'"spread_s":' + repr(bad).replace("True", "true").replace("'", '"')
                   .encode() + b',"version":2}')
        with pytest.raises(ProtocolError, match="spread_s"):
            ReleaseAnnouncement.from_bytes(payload)


def _pick_devices(spread_s: float, version: int) -> list[tuple[float, str]]:
    """Three device names whose offsets sit near 10 %, 50 % and 90 % of the window."""
    names = [f"spread-{i}" for i in range(200)]
    offsets = {n: spread_delay_s(n, "digits", version, spread_s, 0.0, 0.0) for n in names}
    picked = []
    for frac in (0.1, 0.5, 0.9):
        name = min(names, key=lambda n: abs(offsets[n] - frac * spread_s))
        picked.append((offsets[name], name))
    return picked


def test_devices_start_fetching_at_their_own_offsets(loop_env, digits_bundles):
    spread_s = 4.0
    picked = _pick_devices(spread_s, 1)
    for _, name in picked:
        start_agent(loop_env, name)
    loop_env.release(digits_bundles[1].bundle_dir, announce=False)
    released_at = time.time()
    loop_env.publish(Topics.release("digits"),
                     ReleaseAnnouncement("digits", 1, released_at, spread_s).to_bytes(),
                     retain=True)
    starts = []
    for offset, name in picked:
        loop_env.wait_serving(name, 1, timeout_s=90)
        started = wait_event(loop_env, name, "downloading", 1)["ts"] - released_at
        assert started >= offset - 0.25, (name, offset, started)  # waited its turn
        starts.append(started)
    assert starts == sorted(starts)  # in the order of their offsets
    assert starts[-1] - starts[0] >= 0.6 * spread_s  # not all in the same instant
