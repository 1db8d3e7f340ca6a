"""Start a real Mosquitto on a free loopback port (used by the demo, tests and benches)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A mosquitto process with its own config and data dir; ``url`` points at it."""

    def __init__(self, port: int | None = None, extra_conf: str = "",
                 config_text: str | None = None, tls: bool = False) -> None:
        """``config_text``: a whole mosquitto.conf (e.g. from fleet.broker_config) used
        instead of the open default; it must listen on ``port``. ``tls``: url is mqtts://."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto not found: apt-get install mosquitto")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgeship-mosq-"))
        # Started as root, mosquitto drops to the 'mosquitto' user: it must still be able to
        # write its persistence file here, or sessions and queued messages vanish on restart.
        os.chmod(self.dir, 0o777)
        self.extra_conf = extra_conf
        self.config_text = config_text
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config_text if self.config_text is not None else (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.dir}/\n"
            "max_packet_size 4194304\nmax_inflight_messages 100\n"
            "max_queued_messages 10000\nset_tcp_nodelay true\n" + self.extra_conf))
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
