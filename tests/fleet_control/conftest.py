"""Fixtures for fleet-control tests: a real PostgreSQL server in a temporary directory."""

from __future__ import annotations

import os

import pytest

from edgeship.fleet.broker import free_port
from tests.fleet_control.helpers import WIDTH


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (initdb into a temp dir, free port); its URL."""
    from tests.support.postgres import PostgresUnavailable, running_postgres
    try:
        server = running_postgres()
        url = server.__enter__()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    yield url
    server.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_target(request, tmp_path):
    """Both backends: a SQLite file, or a fresh database on the shared PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "fleet.db"
    from tests.support.postgres import fresh_database
    return fresh_database(request.getfixturevalue("postgres_url"),
                          f"t{os.getpid()}_{free_port()}")


@pytest.fixture(scope="session")
def synth_bundles(tmp_path_factory):
    """Synthetic bundles of one model: v1 fast, v2 much slower (8x the compute, same size),
    v3 as fast as v1 (other weights)."""
    pytest.importorskip("onnx")
    from tests.support.synthetic import write_synthetic_bundle
    root = tmp_path_factory.mktemp("synth")
    return {1: write_synthetic_bundle(root / "v1", version=1, width=WIDTH, depth=1),
            2: write_synthetic_bundle(root / "v2", version=2, width=WIDTH, depth=8),
            3: write_synthetic_bundle(root / "v3", version=3, width=WIDTH, depth=1, seed=5)}
