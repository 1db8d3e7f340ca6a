"""MQTT brokers other than Mosquitto, started for real on loopback: aedes 2 (npm, MQTT 5),
alone or as a cluster over Debian's redis-server (mqemitter-redis + aedes-persistence-redis),
and a cluster of ejabberd 23.01 nodes (Debian package, ``mod_mqtt``, joined with
``ejabberdctl join_cluster``). Used by the broker tests and ``scripts/cluster-check``.

Every process gets its own port(s) and temporary directory; nothing touches the system
services. A missing tool raises :class:`BrokerUnavailable` naming what to install.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.agent_process import listen_port

AEDES_SOURCE = Path(__file__).parent / "aedes"
AEDES_VERSION = "2.0.0-beta.1"
EJABBERD_USER = "ejabberd"  # ejabberdctl run as root switches to this user


class BrokerUnavailable(RuntimeError):
    """The broker cannot be started here (a tool is missing); the message says which."""


def _wait_listening(port: int, proc: subprocess.Popen | None, what: str,
                    timeout_s: float = 20.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {detail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s}s")


def _listening_port(log: Path, proc: subprocess.Popen, what: str,
                    timeout_s: float = 30.0) -> int:
    """The port from the ``listening on HOST:PORT`` line a process writes to ``log``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        found = re.search(r"listening on [\d.]+:(\d+)", text)
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening within {timeout_s}s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- aedes -------------------------------------------------------------------------------

def aedes_dir() -> Path:
    """Where the pinned aedes packages are installed: a cache directory named after the
    hash of package.json + package-lock.json (a version bump installs afresh)."""
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json", "broker.mjs"):
        digest.update((AEDES_SOURCE / name).read_bytes())
    cache = Path(os.environ.get("EDGESHIP_CACHE", Path.home() / ".cache" / "edgeship"))
    return cache / f"aedes-{AEDES_VERSION}-{digest.hexdigest()[:12]}"


def ensure_aedes() -> Path:
    """Install aedes and its cluster packages (``npm ci``, pinned by the lock file) once;
    return the directory holding ``broker.mjs`` and ``node_modules``."""
    target = aedes_dir()
    if (target / "node_modules" / "aedes" / "package.json").exists():
        return target
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise BrokerUnavailable(f"aedes needs {tool} (Node.js >= 20) on PATH")
    staging = Path(tempfile.mkdtemp(prefix="aedes-", dir=target.parent
                                    if target.parent.exists() else None))
    for name in ("package.json", "package-lock.json", "broker.mjs"):
        shutil.copy2(AEDES_SOURCE / name, staging / name)
    proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                          cwd=staging, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerUnavailable(f"npm ci for aedes failed: {proc.stderr.strip()[-500:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process installed it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target


class Redis:
    """Debian's redis-server on a free loopback port, no persistence to disk."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise BrokerUnavailable("redis-server not found: apt-get install redis-server")
        self.binary = binary
        self.port = listen_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgeship-redis-"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.port, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Aedes:
    """One aedes 2 process. ``redis_port``: join the cluster sharing that redis;
    ``username``/``password``: clients must log in (else anyone may)."""

    def __init__(self, *, node_id: str = "aedes", redis_port: int | None = None,
                 username: str | None = None, password: str | None = None,
                 hang_subscribe: str | None = None) -> None:
        self.home = ensure_aedes()
        self.port = 0  # known once it listens (it picks a free port itself)
        self.node_id = node_id
        self.redis_port = redis_port
        self.username, self.password = username, password
        self.hang_subscribe = hang_subscribe  # filters with this prefix never get a SUBACK
        self.dir = Path(tempfile.mkdtemp(prefix="edgeship-aedes-"))
        self.log = self.dir / "aedes.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Aedes":
        cmd = ["node", str(self.home / "broker.mjs"), "--port", "0", "--id", self.node_id]
        if self.redis_port is not None:
            cmd += ["--redis-port", str(self.redis_port)]
        if self.password is not None:
            secret = self.dir / "password"
            secret.write_text(self.password + "\n")
            cmd += ["--user", self.username or "", "--password-file", str(secret)]
        if self.hang_subscribe:
            cmd += ["--hang-subscribe", self.hang_subscribe]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.port = _listening_port(self.log, self.proc, f"aedes {self.node_id}")
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class AedesCluster:
    """Two (or more) aedes processes sharing one redis: messages through mqemitter-redis,
    sessions, subscriptions and retained messages through aedes-persistence-redis."""

    name = "aedes"

    def __init__(self, nodes: int = 2, *, username: str | None = None,
                 password: str | None = None) -> None:
        self.username, self.password = username, password
        self.redis = Redis()
        self.nodes = [Aedes(node_id=f"node-{chr(ord('a') + i)}", redis_port=self.redis.port,
                            username=username, password=password) for i in range(nodes)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> "AedesCluster":
        self.redis.start()
        for node in self.nodes:
            node.start()
        return self

    def version(self) -> str:
        return f"aedes {AEDES_VERSION} + redis {_redis_version()}"

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()
        self.redis.stop()


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), "?")


# --- ejabberd ----------------------------------------------------------------------------

_EJABBERD_YML = """\
hosts:
  - localhost
loglevel: info
log_rotate_count: 0
auth_method: internal
auth_password_format: plain
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 1000
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_mqtt:
    max_queue: 10000
"""


class EjabberdNode:
    """One ejabberd node with its own node name, MQTT port, config, spool and log
    directories (owned by the ``ejabberd`` user, as ``ejabberdctl`` runs it)."""

    def __init__(self, name: str, root: Path) -> None:
        if shutil.which("ejabberdctl") is None and not Path("/usr/sbin/ejabberdctl").exists():
            raise BrokerUnavailable("ejabberdctl not found: apt-get install ejabberd")
        if os.geteuid() != 0:
            raise BrokerUnavailable("ejabberd nodes are started as root (ejabberdctl then "
                                    "runs them as the ejabberd user)")
        self.node = f"{name}@localhost"
        self.port = listen_port()
        self.dir = root / name
        for sub in ("conf", "spool", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "conf" / "ejabberd.yml").write_text(_EJABBERD_YML.format(port=self.port))
        shutil.copy2("/etc/ejabberd/inetrc", self.dir / "conf" / "inetrc")
        # sourced by ejabberdctl: Erlang distribution and epmd on loopback only
        (self.dir / "conf" / "ejabberdctl.cfg").write_text(
            'INET_DIST_INTERFACE=127.0.0.1\nERL_EPMD_ADDRESS=127.0.0.1\n'
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        user = pwd.getpwnam(EJABBERD_USER)
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def ctl(self, *args: str, timeout_s: float = 90.0) -> str:
        cmd = ["ejabberdctl", "--config-dir", str(self.dir / "conf"), "--spool",
               str(self.dir / "spool"), "--logs", str(self.dir / "logs"), "--node", self.node,
               *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"ejabberdctl {' '.join(args)} on {self.node} failed "
                               f"({proc.returncode}): {(proc.stdout + proc.stderr)[-1000:]}")
        return proc.stdout

    def start(self) -> "EjabberdNode":
        self.ctl("start")
        self.ctl("started")
        _wait_listening(self.port, None, f"ejabberd {self.node}", timeout_s=60,
                        log=self.dir / "logs" / "ejabberd.log")
        return self

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout_s=30)
            self.ctl("stopped", timeout_s=90)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # already down


class EjabberdCluster:
    """Two (or more) ejabberd nodes joined with ``ejabberdctl join_cluster``; MQTT clients
    log in as ``username`` (registered once, replicated to every node)."""

    name = "ejabberd"

    def __init__(self, nodes: int = 2, *, username: str = "edgeship",
                 password: str = "edgeship-test") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="edgeship-ejabberd-"))
        os.chmod(self.root, 0o755)
        tag = f"edgeship{os.getpid()}"
        self.nodes = [EjabberdNode(f"{tag}-{chr(ord('a') + i)}", self.root)
                      for i in range(nodes)]
        self.username, self.password = username, password

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> "EjabberdCluster":
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.ctl("join_cluster", first.node)
        members = first.ctl("list_cluster")
        missing = [n.node for n in self.nodes if n.node not in members]
        if missing:
            raise RuntimeError(f"ejabberd nodes not in the cluster: {missing}")
        first.ctl("register", self.username, "localhost", self.password)
        return self

    def version(self) -> str:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "ejabberd"],
                             capture_output=True, text=True).stdout
        return f"ejabberd {out or '?'}"

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
