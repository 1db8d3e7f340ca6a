"""From `edgeship provision` to a serving agent, through the locked-down broker: the device
connects over TLS with the certificate it was enrolled with, downloads a release from a fleet
server that has its own identity, and serves it; a revoked device can no longer connect."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.agent.protocol import Topics
from edgeship.fleet.broker import free_port
from edgeship.fleet.broker_config import refresh_acl_and_crl
from edgeship.fleet.provision import EnrollmentSettings, build_enrollment
from edgeship.fleet.registry import Registry
from edgeship.fleet.tuf_repo import init_repository

ROOT = Path(__file__).resolve().parents[2]
EDGESHIP = [sys.executable, "-m", "edgeship"]


class StatusWatcher:
    def __init__(self, locked_broker) -> None:
        self.events: list[dict] = []
        self.cv = threading.Condition()
        ops = locked_broker.identity("operator", "watch")
        self.session, inbox = locked_broker.session(
            ops, subscriptions=[(Topics.DEVICE_STATUS_FILTER, 1)])
        self.inbox = inbox
        assert self.session.wait_subscribed(10)

    def wait_for(self, device: str, event: str, timeout_s: float = 90) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self.inbox.get(timeout=1)
            except Exception:
                continue
            doc = json.loads(msg.payload)
            self.events.append(doc)
            if doc.get("device") == device and doc.get("event") == event:
                return doc
        raise AssertionError(f"no {event} from {device} in {timeout_s}s: {self.events}")


def device_config(bundle, tmp_path):
    """The bundle's config with its device paths mapped into tmp_path (what install-agent
    would do on a board), and its own certificate, key, CA and pinned root."""
    state = tmp_path / "state"
    (state / "tuf").mkdir(parents=True)
    shutil.copyfile(bundle / "root.json", state / "tuf" / "root.json")
    cfg = load_config(bundle / "agent.toml")
    return dataclasses.replace(cfg, state_dir=state, api_port=free_port(),
                               telemetry_interval_s=0.5,
                               tls_ca_file=str(bundle / "ca.crt"),
                               tls_cert_file=str(bundle / "device.crt"),
                               tls_key_file=str(bundle / "device.key"))


def test_provisioned_device_connects_over_tls_and_serves_a_release(locked_broker,
                                                                  digits_bundles, tmp_path):
    init_repository(tmp_path / "keys", tmp_path / "repo")
    bundle = build_enrollment(EnrollmentSettings(
        device_id="pi-e2e", profile="generic-x86_64", mqtt_url=locked_broker.url,
        repo_dir=tmp_path / "repo"), locked_broker.ca, tmp_path / "enroll")
    fleet_id = locked_broker.identity("fleet", "server-1")
    tls = ["--tls-ca", str(locked_broker.ca.cert_path), "--tls-cert", str(fleet_id.cert_path),
           "--tls-key", str(fleet_id.key_path)]
    # the fleet side as an operator runs it: `edgeship fleet serve` and `edgeship release`
    # with the fleet identity's certificate on the command line
    fleet = subprocess.Popen(
        [*EDGESHIP, "fleet", "serve", "--mqtt", locked_broker.url, "--repo",
         str(tmp_path / "repo"), "--db", str(tmp_path / "f.db"), *tls],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = StatusWatcher(locked_broker)
    agent = Agent(device_config(bundle, tmp_path))
    try:
        assert b"serving" in fleet.stdout.readline()
        agent.start()
        assert agent.session.wait_connected(20)
        released = subprocess.run(
            [*EDGESHIP, "release", str(digits_bundles[1].bundle_dir), "--repo",
             str(tmp_path / "repo"), "--keys", str(tmp_path / "keys"), "--mqtt",
             locked_broker.url, *tls], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert released.returncode == 0, released.stderr
        assert "announced" in released.stdout
        ev = watcher.wait_for("pi-e2e", "serving")
        assert ev["version"] == 1
        x = digits_bundles["trained"].data.x_test[:2]
        req = urllib.request.Request(f"{agent.api.url}/v1/models/digits/predict",
                                     data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        # the registry saw the device through the fleet server's own TLS identity
        registry = Registry(tmp_path / "f.db")
        try:
            assert "pi-e2e" in [d.id for d in registry.devices()]
        finally:
            registry.close()
    finally:
        agent.stop()
        watcher.session.stop()
        fleet.send_signal(signal.SIGTERM)
        _, err = fleet.communicate(timeout=20)
    assert fleet.returncode == 0, err.decode()
    # revoke: after the broker restarts with the new CRL, the device cannot come back
    locked_broker.ca.revoke("pi-e2e")
    refresh_acl_and_crl(locked_broker.conf_dir, locked_broker.ca)
    locked_broker.mosq.restart()
    agent = Agent(device_config(bundle, tmp_path / "again"))
    try:
        agent.start()
        assert not agent.session.wait_connected(4)
    finally:
        agent.stop()
