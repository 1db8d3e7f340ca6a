"""Transfer-slot exhaustion: one device that opens many transfers (a 1-byte chunk of each
target, then silence) must not hold the fleet's transfer slots for everyone else."""

from __future__ import annotations

import pytest

from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.transfer import TransferGate
from edgeship.fleet.tuf_repo import release_bundle
from tests.fleet.helpers import make_bundle
from tests.support.attacks import RawDevice


def test_one_device_holds_at_most_its_share_of_slots():
    gate = TransferGate(max_transfers=10, idle_s=60, max_per_device=2)
    for i in range(50):
        assert gate.admit("evil", f"targets/m/1/f{i}", now=float(i) / 100)
    assert gate.active() == 2  # its newest two; the older ones were given up
    for i in range(8):
        assert gate.admit(f"good-{i}", "targets/m/1/f0", now=1.0)
    assert not gate.admit("late", "targets/m/1/f0", now=1.0)  # the global cap still holds


def test_a_device_that_restarts_its_download_keeps_going():
    gate = TransferGate(max_transfers=10, idle_s=60, max_per_device=1)
    assert gate.admit("dev", "targets/m/1/a", now=0.0)
    assert gate.admit("dev", "targets/m/1/b", now=1.0)  # gave up on a: b replaces it
    assert gate.admit("dev", "targets/m/1/b", now=2.0)
    assert gate.active() == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        TransferGate(max_transfers=1, max_per_device=0)


@pytest.fixture
def fleet(broker, tmp_path):
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    from edgeship.fleet.tuf_repo import init_repository
    init_repository(keys, repo)
    paths = []
    for model in ("m1", "m2", "m3"):
        release_bundle(make_bundle(tmp_path / model, model=model), repo, keys)
        paths += [f"targets/{model}/1/{p.name}" for p in (repo / "targets" / model /
                                                         "1").iterdir()]
    server = FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=repo,
                                       db_path=tmp_path / "fleet.db", max_transfers=4))
    server.start()
    yield server, paths
    server.stop()


def test_one_device_opening_many_transfers_does_not_starve_the_others(broker, fleet):
    server, paths = fleet
    evil, good = RawDevice(broker.url, "evil"), RawDevice(broker.url, "good")
    try:
        for path in paths:  # 12 transfers opened with one byte each, never finished
            assert evil.fetch(path)[0] == 200
        status, data = good.fetch(paths[0], length=64)
        assert status == 200 and data
        assert server.gate.active() <= server.settings.max_transfers_per_device + 1
    finally:
        evil.close()
        good.close()
