"""Serving never waits on the network: the real Agent answers every request while its broker
is down or flapping, telemetry keeps being produced into the spool meanwhile, and the same
numbers are on the Prometheus endpoint."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from edgeship.agent.client import AgentClient
from edgeship.agent.config import config_from_dict
from edgeship.fleet.broker import free_port
from tests.runtime.models import IN_DIM, serve, weights, write_dense_onnx


@pytest.fixture
def agent(broker, tmp_path):
    pytest.importorskip("onnx")
    from edgeship.agent.daemon import Agent
    from edgeship.fleet.tuf_repo import init_repository

    init_repository(tmp_path / "keys", tmp_path / "repo")
    (tmp_path / "state" / "tuf").mkdir(parents=True)
    (tmp_path / "state" / "tuf" / "root.json").write_bytes(
        (tmp_path / "repo" / "metadata" / "1.root.json").read_bytes())
    cfg = config_from_dict({"device_id": "dev-offline", "state_dir": str(tmp_path / "state"),
                            "mqtt_url": broker.url, "api_port": free_port(),
                            "metrics_port": free_port(), "telemetry_interval_s": 0.1,
                            "reconnect_min_s": 0.1, "reconnect_max_s": 0.5})
    a = Agent(cfg)
    w, b = weights()
    serve(write_dense_onnx(tmp_path / "dense.onnx", w, b), "onnxruntime", server=a.server)
    a.start()
    assert a.session.wait_connected(10)
    yield a, w, b
    a.stop()


class Load:
    """A client hammering the Unix socket API, recording latency and failures per phase."""

    def __init__(self, url: str, x: np.ndarray) -> None:
        self.url, self.x = url, x
        self.phase = "online"
        self.latencies: dict[str, list[float]] = {}
        self.failures: list[str] = []
        self.outputs: list[np.ndarray] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with AgentClient(self.url, timeout_s=30) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    y = c.predict("dense", self.x)
                except Exception as e:  # any failure is what this test looks for
                    self.failures.append(f"{self.phase}: {e!r}")
                    continue
                self.latencies.setdefault(self.phase, []).append(time.perf_counter() - t0)
                if len(self.outputs) < 5:
                    self.outputs.append(y)
                elif not np.array_equal(y, self.outputs[0]):
                    self.failures.append(f"{self.phase}: output changed")
                time.sleep(0.002)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_inference_is_unaffected_while_the_broker_is_down_or_flapping(agent, broker):
    a, w, b = agent
    x = np.random.default_rng(0).normal(size=(2, IN_DIM)).astype(np.float32)
    with Load(a.unix_api.url, x) as load:
        time.sleep(1.0)
        load.phase = "down"
        pushed_before = a.spool.stats().pushed
        broker.stop()
        time.sleep(1.5)
        assert a.spool.stats().pushed > pushed_before  # telemetry kept being produced
        load.phase = "flapping"
        for _ in range(3):
            broker.start()
            time.sleep(0.3)
            broker.stop()
            time.sleep(0.3)
        broker.start()
        load.phase = "back"
        assert a.session.wait_connected(15)
        time.sleep(0.5)
    assert load.failures == []
    for phase in ("online", "down", "flapping", "back"):
        lat = load.latencies.get(phase, [])
        assert len(lat) >= 5, f"too few requests in phase {phase}"
        assert max(lat) < 5.0, f"a request stalled for {max(lat):.2f}s while {phase}"
    z = x @ w.T + b
    e = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(load.outputs[0], e / e.sum(1, keepdims=True), atol=1e-5)
    # everything produced offline is delivered once the broker is back
    deadline = time.monotonic() + 20
    while a.spool.stats().queued > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a.spool.stats().queued <= 1 and a.spool.stats().evicted == 0


def test_prometheus_endpoint_has_the_same_numbers(agent):
    a, _, _ = agent
    with AgentClient(a.api.url) as c:
        for _ in range(7):
            c.predict("dense", np.ones((3, IN_DIM), np.float32))
        with pytest.raises(Exception):
            c.predict("dense", np.ones((1, 1), np.float32))
    totals = a.server.stats["dense"].totals()
    with urllib.request.urlopen(f"http://127.0.0.1:{a.cfg.metrics_port}/metrics",
                                timeout=10) as resp:
        text = resp.read().decode()
    labels = '{model="dense",variant="onnxruntime-fp32",version="1"}'
    assert f"edgeship_model_requests_total{labels} {float(totals['requests'])}" in text
    assert f"edgeship_model_errors_total{labels} 1.0" in text
    assert totals["samples"] >= 21
    assert f"edgeship_model_samples_total{labels} {float(totals['samples'])}" in text
    count = re.search(r'edgeship_model_latency_seconds_count\{model="dense",[^}]*\} (\S+)',
                      text)
    assert count and float(count.group(1)) == totals["requests"] - totals["errors"]
    inf = re.search(r'edgeship_model_latency_seconds_bucket\{le="\+Inf",model="dense"[^}]*\} '
                    r'(\S+)', text)
    assert inf and float(inf.group(1)) == float(count.group(1))
    assert "edgeship_telemetry_queued" in text and "edgeship_telemetry_evicted_total" in text
    assert "edgeship_device_rss_mb" in text or a.telemetry.last_system == {}
