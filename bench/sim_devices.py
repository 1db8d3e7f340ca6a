"""A light device simulator for ``scripts/bench-control``: ``count`` simulated devices in one
process, each a real MQTT 5 client (its own connection and client id, persistent session,
retained presence with an offline will) speaking the real protocol through
:class:`edgeship.common.mqtt.MqttSession` on a shared network thread:

- presence (retained) on connect, telemetry every ``--telemetry-s`` with a system sample;
- it follows a release announcement (honouring its spread) or its per-device desired
  state: status ``downloading``; then transfers over MQTT 5 request/response of
  ``timestamp.json``, the snapshot and targets metadata they name, and the release's
  manifest (checked against the sha256 the targets metadata gives); then ``serving`` and a
  new presence naming the version.

What it leaves out is what a real agent does with the bytes: signature checks, the model
download, the health check (``scripts/bench-fleet`` runs real agents for that). Prints
``READY n`` when every device is connected; stdin ``stop`` ends it; at the end prints one
JSON line of counters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import threading
import time
from typing import Any

from edgeship.agent import protocol
from edgeship.common.mqtt import Message, MqttSession, SessionSettings
from edgeship.common.mqtt_loop import SharedLoop
from edgeship.agent.protocol import (DesiredState, ReleaseAnnouncement, Topics,
                                     TransferRequest, spread_delay_s)

REQUEST_TIMEOUT_S = 30.0  # no answer by then: ask again (what a real agent's fetcher does)


class SimDevice:
    def __init__(self, device: str, url: str, loop: SharedLoop, model: str,
                 telemetry_s: float, counters: dict[str, int]) -> None:
        self.device, self.model, self.loop = device, model, loop
        self.telemetry_s, self.counters = telemetry_s, counters
        self.version: int | None = None
        self.seq = 0
        self.target: int | None = None  # version being installed
        self._pending: tuple[bytes, str, Any] | None = None  # correlation, path, callback
        self._asked_at = 0.0
        self.connected_at: float | None = None  # a new value per connection, as agents do
        will = (Topics.presence(device), self._presence(False), True)
        self.session = MqttSession(
            SessionSettings(url=url, client_id=f"edgeship-agent-{device}", clean_start=False,
                            session_expiry_s=3600, keepalive_s=60, will=will,
                            reconnect_min_s=1.0, reconnect_max_s=20.0),
            self._on_message, on_connect=self._on_connect, loop=loop)

    def start(self) -> None:
        self.session.start([(Topics.desired(self.device), 1),
                            (Topics.release(self.model), 1),
                            (Topics.transfer_response(self.device), 1)])

    # --- reports ----------------------------------------------------------------------

    def _presence(self, online: bool) -> bytes:
        models = {self.model: {"version": self.version, "variant": "onnx-fp32"}} \
            if self.version is not None and online else {}
        return protocol.encode("presence", {"device": self.device, "online": online,
                                            "ts": time.time(), "agent_version": "sim",
                                            "profile": "rpi4", "arch": "aarch64",
                                            "models": models,
                                            "connected_at": self.connected_at if online
                                            else None})

    def _on_connect(self) -> None:
        self.connected_at = time.time()  # the fleet catches a device up once per connection
        self.session.publish(Topics.presence(self.device), self._presence(True), retain=True)
        self.loop.call_later(random.uniform(0, self.telemetry_s), self._telemetry)

    def _status(self, event: str, **extra: Any) -> None:
        self.session.publish(Topics.status(self.device), protocol.status_event(
            self.device, event, model=self.model, version=self.target, **extra))

    def _telemetry(self) -> None:
        models = {} if self.version is None else {self.model: {
            "version": self.version, "requests": 0, "errors": 0, "latency_ms": {}}}
        body = {"device": self.device, "ts": time.time(), "models": models, "system": {
            "cpu_percent": random.uniform(2, 60), "temperature_c": random.uniform(40, 70),
            "memory": {"total_mb": 3800.0, "available_mb": random.uniform(1000, 3000)}}}
        self.session.publish(Topics.telemetry(self.device), protocol.encode("telemetry", body))
        self.counters["telemetry"] += 1
        self.loop.call_later(self.telemetry_s, self._telemetry)

    # --- what the fleet says ------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:  # on the shared loop's thread
        try:
            if msg.topic == Topics.transfer_response(self.device):
                return self._on_answer(msg)
            if not msg.payload:
                return
            if msg.topic == Topics.desired(self.device):
                desired = DesiredState.from_bytes(msg.payload)
                if desired.seq > self.seq:
                    self.seq = desired.seq
                    self._install(desired.version, 0.0)
            elif self.seq == 0:  # announcements only count without a desired state
                ann = ReleaseAnnouncement.from_bytes(msg.payload)
                self._install(ann.version, spread_delay_s(
                    self.device, ann.model, ann.version, ann.spread_s, ann.released_at,
                    time.time()))
        except Exception:  # a simulated device must survive anything the fleet sends
            self.counters["errors"] += 1
            logging.exception("%s: message on %s", self.device, msg.topic)

    def _install(self, version: int, delay_s: float) -> None:
        if version == self.version or version == self.target:
            return
        self.target = version
        self.loop.call_later(delay_s, self._begin)

    def _begin(self) -> None:
        self._status("downloading")
        self._fetch("metadata/timestamp.json", self._got_timestamp)

    # --- transfers: metadata and the manifest --------------------------------------------

    def _fetch(self, path: str, then) -> None:
        correlation = random.randbytes(8)
        self._pending = (correlation, path, then)
        self._asked_at = time.monotonic()
        self.session.publish(Topics.transfer_request(self.device),
                             TransferRequest(path, 0, protocol.MAX_CHUNK_BYTES).to_bytes(),
                             response_topic=Topics.transfer_response(self.device),
                             correlation_data=correlation)
        self.counters["requests"] += 1
        self.loop.call_later(REQUEST_TIMEOUT_S, lambda c=correlation: self._timeout(c))

    def _timeout(self, correlation: bytes) -> None:
        if self._pending is not None and self._pending[0] == correlation:
            self.counters["retries"] += 1
            self._fetch(self._pending[1], self._pending[2])

    def _on_answer(self, msg: Message) -> None:
        pending = self._pending
        if pending is None or msg.correlation_data != pending[0]:
            self.counters["unmatched"] += 1
            return
        props = msg.user_properties
        status = int(props.get(protocol.TRANSFER_STATUS, "0"))
        if status == 503:  # busy: ask again a little later
            self.counters["busy"] += 1
            self._pending = None
            self.loop.call_later(random.uniform(1, 5), lambda: self._fetch(*pending[1:]))
            return
        self._pending = None
        if status != 200 or int(props.get(protocol.TRANSFER_TOTAL, -1)) != len(msg.payload):
            self.counters["failed"] += 1
            self._status("failed", reason="transfer_failed",
                         detail=f"{pending[1]}: status {status}")
            self.target = None
            return
        self.counters["bytes"] += len(msg.payload)
        pending[2](msg.payload)

    def _got_timestamp(self, data: bytes) -> None:
        meta = json.loads(data)["signed"]["meta"]["snapshot.json"]
        self._fetch(f"metadata/{meta['version']}.snapshot.json", self._got_snapshot)

    def _got_snapshot(self, data: bytes) -> None:
        meta = json.loads(data)["signed"]["meta"]["targets.json"]
        self._fetch(f"metadata/{meta['version']}.targets.json", self._got_targets)

    def _got_targets(self, data: bytes) -> None:
        targets = json.loads(data)["signed"]["targets"]
        name = f"{self.model}/{self.target}/manifest.json"
        info = targets.get(name)
        if info is None:
            self.counters["failed"] += 1
            self._status("failed", reason="target_not_found", detail=name)
            self.target = None
            return
        sha = info["hashes"]["sha256"]
        self._fetch(f"targets/{self.model}/{self.target}/{sha}.manifest.json",
                    lambda body: self._got_manifest(body, sha))

    def _got_manifest(self, data: bytes, sha: str) -> None:
        if hashlib.sha256(data).hexdigest() != sha:
            self.counters["failed"] += 1
            self._status("failed", reason="hash_mismatch", detail="manifest")
            self.target = None
            return
        json.loads(data)  # a manifest, as the agent would read it
        self.version, self.target = self.target, None
        self.session.publish(Topics.status(self.device), protocol.status_event(
            self.device, "serving", model=self.model, version=self.version,
            variant="onnx-fp32"))
        self.session.publish(Topics.presence(self.device), self._presence(True), retain=True)
        self.counters["serving"] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--model", default="synth")
    p.add_argument("--telemetry-s", type=float, default=60.0)
    p.add_argument("--connect-per-s", type=float, default=500.0,
                   help="new connections per second from this process")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    counters = {k: 0 for k in ("requests", "retries", "busy", "failed", "unmatched", "bytes",
                               "serving", "telemetry", "errors")}
    loop = SharedLoop(name="sim-mqtt")
    devices = [SimDevice(f"sim-{i:05d}", args.url, loop, args.model, args.telemetry_s,
                         counters) for i in range(args.first, args.first + args.count)]
    for i, d in enumerate(devices):
        d.start()
        if i % 50 == 49:
            time.sleep(50 / args.connect_per_s)
    deadline = time.monotonic() + 300
    while not all(d.session.connected for d in devices) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"READY {sum(d.session.connected for d in devices)}", flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    stop.wait()
    for d in devices:
        d.session.stop()
    loop.stop()
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
