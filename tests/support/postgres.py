"""A real PostgreSQL server in a temporary directory on a free port (initdb + postgres, as
the ``postgres`` system user when run as root), for tests and benchmarks."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgeship.fleet.broker import free_port


class PostgresUnavailable(RuntimeError):
    """The server binaries, runuser or psycopg are missing (the caller skips)."""


def pg_bindir() -> Path | None:
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
        raise PostgresUnavailable("running as root and runuser is missing")
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def running_postgres(*settings: str) -> Iterator[str]:
    """Start a server (``settings``: extra ``-c name=value``); yield its URL; stop it."""
    try:
        import psycopg
    except ImportError as e:
        raise PostgresUnavailable("psycopg is not installed") from e
    bindir = pg_bindir()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, postgres) are missing")
    root = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
    root.chmod(0o777)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "edgeship",
                                 "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    extra = [a for s in ("fsync=off", *settings) for a in ("-c", s)]
    proc = subprocess.Popen(_as_postgres([str(bindir / "postgres"), "-D", str(data), "-p",
                                          str(port), "-k", str(sock), "-h", "127.0.0.1",
                                          *extra]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://edgeship@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server at ``url``; its URL."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + f"/{name}"
