"""Telemetry windows are labelled with the version served when they are sent: a swap to a
new version must start a fresh window, or the old version's latencies would be reported as
the new one's (and rollout latency gates would compare the wrong numbers).

The stats behind those windows are kept cheaply on the request path (a ring of latencies and
a bucket counter); these tests pin what telemetry and Prometheus read from them."""

import sys
import threading
from types import SimpleNamespace

import numpy as np

from edgeship.agent.serving import LATENCY_RING_SIZE, LoadedModel, ModelServer, ModelStats
from tests.runtime.models import manifest_for


def _loaded(version: int) -> LoadedModel:
    inst = SimpleNamespace(model="m", version=version, manifest=manifest_for("m.onnx", "x"))
    return LoadedModel(inst, runtime=SimpleNamespace(run=lambda inputs: [inputs["x"]]))


def test_swapping_to_a_new_version_starts_a_fresh_telemetry_window():
    server = ModelServer()
    server.swap(_loaded(1))
    for _ in range(5):
        server.stats["m"].record(10.0)
    server.swap(_loaded(2))
    server.stats["m"].record(30.0)
    snap = server.stats["m"].snapshot(reset=True)
    assert snap["requests"] == 1 and snap["latency_ms"]["p50"] == 30.0
    assert server.stats["m"].total_requests == 6  # cumulative counters are kept


def test_reloading_the_same_version_keeps_the_window():
    server = ModelServer()
    server.swap(_loaded(1))
    server.stats["m"].record(10.0)
    server.swap(_loaded(1))
    assert server.stats["m"].snapshot(reset=True)["requests"] == 1


def test_window_percentiles_come_from_the_newest_latencies_after_the_ring_wraps():
    stats = ModelStats()
    for _ in range(LATENCY_RING_SIZE):
        stats.record(100.0)  # old, slow: must have left the ring
    stats.snapshot(reset=True)
    extra = LATENCY_RING_SIZE // 2
    for i in range(LATENCY_RING_SIZE + extra):  # wraps the ring once more
        stats.record(1.0 if i >= extra else 50.0)
    snap = stats.snapshot(reset=True)
    assert snap["requests"] == LATENCY_RING_SIZE + extra
    assert snap["latency_ms"]["count"] == LATENCY_RING_SIZE
    assert snap["latency_ms"]["p99"] == 1.0  # only the newest ring-full counts
    assert stats.snapshot(reset=True)["latency_ms"]["count"] == 0  # reset empties it
    counts, sum_ms = stats.histogram()  # cumulative: every request, none lost to the ring
    assert (counts[8], counts[7], counts[2]) == (LATENCY_RING_SIZE, extra, LATENCY_RING_SIZE)
    assert sum(counts) == 2 * LATENCY_RING_SIZE + extra
    assert abs(sum_ms - (100.0 * LATENCY_RING_SIZE + 50.0 * extra + LATENCY_RING_SIZE)) < 1e-3


def test_window_percentiles_match_numpy_over_a_partial_ring():
    stats = ModelStats()
    lat = np.random.default_rng(0).uniform(0.01, 30, size=1000)
    for v in lat:
        stats.record(float(v), samples=2)
    snap = stats.snapshot(reset=False)
    for q, p in (("p50", 50), ("p95", 95), ("p99", 99)):
        assert abs(snap["latency_ms"][q] - np.percentile(lat, p)) < 1e-5
    assert snap["samples"] == 2000 and snap["requests"] == 1000
    assert stats.snapshot(reset=False)["requests"] == 1000  # reset=False keeps the window


def test_histogram_is_cumulative_and_bucketed_by_upper_bound():
    stats = ModelStats()
    for ms in (0.1, 0.25, 0.3, 7.0, 9999.0):
        stats.record(ms)
    stats.record(None)  # a failure has no latency
    stats.snapshot(reset=True)  # windows do not touch the cumulative histogram
    counts, sum_ms = stats.histogram()
    assert counts[0] == 2 and counts[1] == 1 and counts[5] == 1 and counts[-1] == 1
    assert sum(counts) == 5 and abs(sum_ms - (0.1 + 0.25 + 0.3 + 7.0 + 9999.0)) < 1e-6
    assert stats.totals() == {"requests": 6, "errors": 1, "samples": 6}


def test_client_errors_do_not_count_against_the_model():
    stats = ModelStats()
    stats.record(None, client_error=True)
    stats.record(None)
    assert (stats.total_errors, stats.total_model_errors) == (2, 1)


def test_counts_stay_exact_with_concurrent_requests():
    server = ModelServer()
    server.swap(_loaded(1))
    x = np.ones((2, 8), np.float32)
    threads = [threading.Thread(target=lambda: [server.predict("m", x) for _ in range(2000)])
               for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    stats = server.stats["m"]
    assert stats.totals() == {"requests": 8000, "errors": 0, "samples": 16000}
    assert sum(stats.histogram()[0]) == 8000
