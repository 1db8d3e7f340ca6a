"""Quality reports in the registry on both backends (SQLite and a real PostgreSQL): written
with the telemetry batch, read back as each device's latest window per version and its
latest cumulative labelled counts, pooled into a wave's observation, bucketed for the
dashboard's series, and pruned with the telemetry."""

from __future__ import annotations

from edgeship.agent.quality.metrics import ClassCounts
from edgeship.fleet.registry import Registry, RegistrySettings


def _telemetry(version: int, hist: list[int], *, labelled: dict | None = None,
               above: int | None = None) -> dict:
    n = sum(hist)
    return {"device": "x", "models": {}, "quality": {"m": {
        "version": version, "profile": "ok",
        "drift": {"samples": n, "reference_samples": 400, "signals": {
            "x:mean": {"js": 0.0, "counts": hist, "ref": [0.25] * 4}},
            "estimate": {"samples": n, "above": n if above is None else above,
                         "reference_accuracy": 0.9}},
        "labelled": labelled or {}}}}


def _counts(n: int, right: int) -> dict:
    c = ClassCounts(4)
    for i in range(n):
        c.add(i % 4 if i < right else (i + 1) % 4, i % 4)
    return c.to_dict()


def test_reports_round_trip_pool_and_prune(registry_target):
    clock = [1000.0]
    registry = Registry(registry_target, RegistrySettings(max_telemetry_rows=6, prune_every=1),
                        clock=lambda: clock[0])
    try:
        registry.add_reports([
            ("telemetry", "a", _telemetry(1, [10, 10, 10, 10], labelled={"1": _counts(50, 45)})),
            ("telemetry", "b", _telemetry(1, [20, 0, 0, 20])),
            ("telemetry", "c", {"device": "c", "quality": {"m": {"version": "bad"}}}),
        ])
        clock[0] = 1010.0
        registry.add_reports([
            ("telemetry", "a", _telemetry(2, [5, 5, 5, 5], above=10,
                                          labelled={"1": _counts(60, 54), "2": _counts(40, 20)})),
        ])
        store = registry.quality
        assert sorted(store.versions("m")) == [1, 2] and store.models() == ["m"]
        assert {r.device for r in store.windows("m", 1, 0)} == {"a", "b"}
        assert [r.device for r in store.windows("m", 2, 1005)] == ["a"]
        latest = {r.device: r for r in store.latest("m")}
        assert latest["a"].version == 2 and latest["a"].labelled(1).n == 60
        obs = store.observation("m", 2, 1, ["a"], since=1005, baseline_since=0)
        assert obs.new.estimate == 0.5 and obs.new.labelled.n == 40
        assert obs.old.labelled.n == 60 and obs.old.window_samples == 80
        series = store.series("m", 0, bucket_s=10)
        assert [(s["version"], s["estimate_samples"]) for s in series] == [(1, 80), (2, 20)]
        for i in range(8):
            registry.add_reports([("telemetry", "a", _telemetry(2, [1, 1, 1, 1]))])
        assert len(store.windows("m", 1, 0)) == 0  # pruned with the telemetry rows
    finally:
        registry.close()
