"""Desired state on the device side: the message contract, and the newest ``seq`` wins —
redelivered, out-of-order and stale retained commands never move a device backwards,
across restarts too."""

from __future__ import annotations

import json

import pytest

from edgeship.agent.update.desired import DesiredTracker
from edgeship.agent.errors import ProtocolError
from edgeship.agent.protocol import DesiredState


def test_desired_state_round_trips_and_rejects_bad_messages():
    ds = DesiredState("digits", 3, 17, "r-1")
    assert DesiredState.from_bytes(ds.to_bytes()) == ds
    for bad in ({"model": "digits", "version": 0, "seq": 1},
                {"model": "digits", "version": 2, "seq": "7"},
                {"model": "../x", "version": 2, "seq": 1},
                {"model": "digits", "version": 2, "seq": 1, "rollout": 5}):
        with pytest.raises(ProtocolError):
            DesiredState.from_bytes(json.dumps({"schema": 1, "kind": "desired",
                                                **bad}).encode())


def test_newest_seq_wins_even_after_restart(tmp_path):
    t = DesiredTracker(tmp_path)
    assert not t.governs("digits")
    assert t.accept(DesiredState("digits", 2, 5))
    assert not t.accept(DesiredState("digits", 2, 5))      # redelivered
    assert not t.accept(DesiredState("digits", 9, 4))      # older command arriving late
    assert t.accept(DesiredState("digits", 1, 6))          # a rollback is a newer command
    assert t.version("digits") == 1
    restarted = DesiredTracker(tmp_path)                   # persisted before acting
    assert restarted.version("digits") == 1
    assert not restarted.accept(DesiredState("digits", 2, 5))  # stale retained message
    assert restarted.items() == [("digits", 1)]


def test_unreadable_state_file_is_ignored(tmp_path):
    (tmp_path / "desired.json").write_text("{not json")
    assert DesiredTracker(tmp_path).items() == []


def test_local_api_can_be_disabled_in_the_config(tmp_path):
    from edgeship.agent.config import config_from_dict
    from edgeship.agent.errors import ConfigError
    base = {"device_id": "pi-1", "state_dir": str(tmp_path)}
    assert config_from_dict(base).api_enabled is True
    assert config_from_dict({**base, "api_enabled": False}).api_enabled is False
    with pytest.raises(ConfigError, match="api_enabled"):
        config_from_dict({**base, "api_enabled": "no"})
