"""Real agents against a real broker: quality travels with the telemetry (store-and-forward),
feedback posted to a running agent's API comes back as labelled counts."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import numpy as np

from edgeship.common.mqtt import Message, MqttSession, SessionSettings
from edgeship.agent.protocol import Topics
from tests.support.loop_env import predict
from tests.support.synthetic import write_quality_bundle

WIDTH = 16


class TelemetryTap:
    """Every telemetry record on the broker, as received."""

    def __init__(self, url: str) -> None:
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self.session = MqttSession(SessionSettings(url=url, client_id=f"tap-{os.getpid()}",
                                                   clean_start=True, session_expiry_s=0),
                                   self._on)
        self.session.start([(Topics.DEVICE_TELEMETRY_FILTER, 1)])
        assert self.session.wait_subscribed(10)

    def _on(self, msg: Message) -> None:
        with self._lock:
            self.records.append(json.loads(msg.payload))

    def wait(self, pred, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                for r in reversed(self.records):
                    if pred(r):
                        return r
            time.sleep(0.1)
        raise AssertionError(f"no matching telemetry in {timeout_s}s")


def _post(agent, path, doc):
    req = urllib.request.Request(f"{agent.api.url}{path}", data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_quality_reaches_the_broker_with_drift_and_labelled_counts(loop_env, tmp_path):
    bundle = write_quality_bundle(tmp_path / "b", width=WIDTH)
    tap = TelemetryTap(loop_env.url)
    agent = loop_env.start_agent("q-1")
    loop_env.release(bundle)
    loop_env.wait_serving("q-1", 1)
    rng = np.random.default_rng(0)
    answers = [predict(agent, "synq", rng.standard_normal((1, WIDTH)).astype(np.float32) + 2)
               for _ in range(64)]
    items = [{"id": a["id"], "label": int(np.argmax(a["outputs"]["logits"][0]))}
             for a in answers]
    assert _post(agent, "/v1/models/synq/feedback", {"items": items})["accepted"] == 64
    record = tap.wait(lambda r: r.get("device") == "q-1" and
                      r.get("quality", {}).get("synq", {}).get("labelled", {})
                      .get("1", {}).get("n") == 64)
    q = record["quality"]["synq"]
    assert q["profile"] == "ok" and q["version"] == 1
    assert q["drift"]["samples"] >= 64
    assert q["drift"]["signals"]["x:mean"]["js"] > 0.5  # inputs shifted by +2
    assert q["feedback"]["accepted"] == 64
    assert "inputs" not in json.dumps(q)  # counts and scores only, never a sample
    tap.session.stop()
