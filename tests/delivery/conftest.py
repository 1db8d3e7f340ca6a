from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgeship.fleet.broker import free_port
from tests.delivery.helpers import start_agent


@pytest.fixture
def serving_v1(loop_env, digits_bundles):
    """Device 'dev' serving digits v1; v2 is not released yet."""
    agent = start_agent(loop_env, "dev")
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1)
    before = agent.store.active("digits").model_path.read_bytes()
    return agent, before, digits_bundles["trained"].data.x_test[:2]


@pytest.fixture
def serving_v2(loop_env, digits_bundles, serving_v1):
    agent, _, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir)
    loop_env.wait_serving("dev", 2)
    return agent, agent.store.active("digits").model_path.read_bytes(), x


@pytest.fixture
def nginx(tmp_path):
    """nginx on a free loopback port, serving ``tmp_path/repo``; config, logs, pid in tmp."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx not installed")
    repo, run = tmp_path / "repo", tmp_path / "nginx"
    run.mkdir()
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read tmp_path
    temps = "".join(f"{k}_temp_path {run}/{k};\n" for k in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (run / "nginx.conf").write_text(
        f"{user}daemon off;\npid {run}/nginx.pid;\nerror_log {run}/error.log;\n"
        "worker_processes 1;\nevents {}\nhttp {\n"
        f"access_log {run}/access.log;\n{temps}"
        f"server {{ listen 127.0.0.1:{port}; root {repo};\n"
        "  location ~ /\\. { deny all; } }\n}\n")
    proc = subprocess.Popen([binary, "-p", str(run), "-c", str(run / "nginx.conf")],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", repo, run / "access.log"
    proc.terminate()
    proc.wait(10)
