"""Fixtures for the broker tests: aedes 2 (MQTT 5, no shared subscriptions), alone, with a
login, or with a SUBSCRIBE it never answers. Skipped with the reason when Node.js or npm is
missing (scripts/_setup.sh installs the pinned packages)."""

from __future__ import annotations

import pytest

from tests.support.brokers import Aedes, BrokerUnavailable

USER, PASSWORD = "fleet-user", "s3cret-from-a-file"
HANG = "hang/"


def _aedes(**kwargs) -> Aedes:
    try:
        return Aedes(**kwargs).start()
    except BrokerUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def aedes():
    broker = _aedes(hang_subscribe=HANG)
    yield broker
    broker.cleanup()


@pytest.fixture(scope="module")
def aedes_login():
    broker = _aedes(username=USER, password=PASSWORD)
    yield broker
    broker.cleanup()
