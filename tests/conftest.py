from __future__ import annotations

import pytest

from fleet.broker import Mosquitto


@pytest.fixture
def broker():
    """A fresh, real Mosquitto broker on a free loopback port for one test."""
    mosq = Mosquitto().start()
    yield mosq
    mosq.cleanup()


@pytest.fixture(scope="session")
def shared_broker():
    """One real broker for tests that only need to talk (not to restart it)."""
    mosq = Mosquitto().start()
    yield mosq
    mosq.cleanup()
