"""Telemetry windows are labelled with the version served when they are sent: a swap to a
new version must start a fresh window, or the old version's latencies would be reported as
the new one's (and rollout latency gates would compare the wrong numbers)."""

from types import SimpleNamespace

from agent.serving import LoadedModel, ModelServer


def _loaded(version: int) -> LoadedModel:
    return LoadedModel(SimpleNamespace(model="m", version=version), runtime=None)


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
