"""Fixtures for fleet-control tests: a real PostgreSQL server in a temporary directory."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from edgeship.fleet.broker import free_port
from tests.fleet_control.helpers import WIDTH


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    return Path(which).parent if which else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb/postgres refuse to run as root: run them as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser is missing: cannot start PostgreSQL")
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (initdb into a temp dir, free port); its URL."""
    pytest.importorskip("psycopg")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    root = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
    root.chmod(0o777)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "edgeship",
                                 "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    proc = subprocess.Popen(_as_postgres([str(bindir / "postgres"), "-D", str(data), "-p",
                                          str(port), "-k", str(sock), "-h", "127.0.0.1",
                                          "-c", "fsync=off"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://edgeship@127.0.0.1:{port}/postgres"
    import psycopg
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_target(request, tmp_path):
    """Both backends: a SQLite file, or a fresh database on the shared PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "fleet.db"
    url = request.getfixturevalue("postgres_url")
    import psycopg
    name = f"t{os.getpid()}_{free_port()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + f"/{name}"


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
