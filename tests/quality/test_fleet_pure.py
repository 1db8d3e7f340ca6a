"""The fleet's side, pure: pooling device reports per version, honest summaries, and the
quality gates a rollout wave is judged by."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.agent.quality.metrics import ClassCounts
from edgeship.fleet.quality import (QualityReport, pool_labelled, pool_windows, summary,
                                    version_quality)
from edgeship.fleet.quality_gates import QualityObservation, check
from edgeship.fleet.rollout import (DeviceStats, Gates, Policy, WaveObservation,
                                    evaluate_wave)

REF = [0.25, 0.25, 0.25, 0.25]


def _counts(accuracy: float, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    c = ClassCounts(4)
    for _ in range(n):
        t = int(rng.integers(0, 4))
        c.add(t if rng.random() < accuracy else (t + 1) % 4, t)
    return c.to_dict()


def _report(device, version, hist, *, above=None, labelled=None, ts=0.0, method=None):
    n = int(sum(hist))
    drift = {"samples": n, "reference_samples": 400,
             "signals": {"x:mean": {"counts": list(hist), "ref": REF}},
             "estimate": {"samples": n, "above": n if above is None else above,
                          "reference_accuracy": 0.9}}
    if method:
        drift["estimate"]["method"] = method
    return QualityReport(device, ts, "m", version, {"version": version, "drift": drift,
                                                    "labelled": labelled or {}})


def test_windows_pool_exactly_and_chance_shrinks_with_more_devices():
    one = pool_windows([_report("a", 2, [30, 20, 25, 25])])
    many = pool_windows([_report(d, 2, [30, 20, 25, 25]) for d in "abcd"])
    assert many.window_samples == 400 and many.devices == 4
    assert many.signals["x:mean"].counts.tolist() == [120, 80, 100, 100]
    assert many.drift()["x:mean"]["js"] == pytest.approx(one.drift()["x:mean"]["js"])
    assert many.drift()["x:mean"]["chance"] < one.drift()["x:mean"]["chance"]
    assert many.estimate == 1.0


def test_labelled_counts_add_up_across_devices_and_versions_stay_apart():
    reports = [_report("a", 2, [1, 1, 1, 1], labelled={"1": _counts(0.9, 100),
                                                       "2": _counts(0.8, 50)}),
               _report("b", 2, [1, 1, 1, 1], labelled={"2": _counts(0.8, 70, 1)})]
    v2, devices = pool_labelled(reports, 2)
    assert (v2.n, devices) == (120, 2)
    v1, devices = pool_labelled(reports, 1)
    assert (v1.n, devices) == (100, 1)


def test_summary_says_so_with_too_few_labels_and_marks_the_estimate():
    vq = version_quality([_report("a", 2, [10, 10, 10, 10], above=30)],
                         [_report("a", 2, [1], labelled={"2": _counts(0.9, 50)})], 2)
    doc = summary(vq, min_labelled=200)
    assert "accuracy" not in doc["labelled"] and "too few labels (50" in \
        doc["labelled"]["note"]
    assert doc["estimate"]["is_estimate"] is True and doc["estimate"]["accuracy"] == 0.75
    empty = summary(version_quality([], [], 3))
    assert empty["labelled"]["note"] == "no labels yet"
    assert empty["estimate"]["accuracy"] is None and "no estimate" in empty["estimate"]["note"]
    vq.labelled = ClassCounts.from_dict(_counts(0.9, 400))
    full = summary(vq)["labelled"]
    assert full["samples"] == 400 and full["accuracy_ci"][0] < full["accuracy"]


def _obs(new_hist=(100, 100, 100, 100), new_above=None, new_acc=0.9, old_acc=0.9,
         n=1000, old_above=None):
    new = version_quality([_report(d, 2, new_hist, above=new_above) for d in "ab"],
                          [_report("a", 2, [1], labelled={"2": _counts(new_acc, n, 1)})], 2)
    old = version_quality([_report("c", 1, (100, 100, 100, 100), above=old_above)],
                          [_report("c", 1, [1], labelled={"1": _counts(old_acc, n, 2)})], 1)
    return QualityObservation(new, old)


@pytest.mark.parametrize("obs,gate", [
    (_obs(new_hist=(400, 0, 0, 0)), "drift"),
    (_obs(new_above=280, old_above=380), "estimated_accuracy"),  # 70 % vs 95 %
    (_obs(new_acc=0.8, old_acc=0.92), "accuracy"),
])
def test_each_quality_gate_halts_on_its_own_evidence(obs, gate):
    measured: dict = {}
    failure = check(obs, Gates().quality_limits(), measured)
    assert failure is not None and failure.gate == gate, measured


def test_no_halt_on_the_same_quality_or_on_too_little_data():
    measured: dict = {}
    assert check(_obs(), Gates().quality_limits(), measured) is None
    assert measured["drift_js"] < 0.05 and measured["accuracy_new"] > 0.85
    few: dict = {}
    assert check(_obs(new_hist=(40, 0, 0, 0), new_acc=0.5, n=100),
                 Gates().quality_limits(), few) is None
    assert "too few" in few["drift_note"] and "too few labels" in few["labelled_note"]


def test_a_wave_fails_on_drift_after_the_other_gates_pass():
    devices = ("a", "b")
    obs = WaveObservation(devices=devices, started_at=0.0,
                          outcomes={d: ("serving", None) for d in devices},
                          new_stats={d: DeviceStats(requests=50, p50_ms=1.0) for d in devices},
                          baseline={d: DeviceStats(requests=50, p50_ms=1.0) for d in devices},
                          installed_at=0.0, quality=_obs(new_hist=(400, 0, 0, 0)))
    verdict = evaluate_wave(obs, Policy(soak_s=0), now=10.0)
    assert verdict.decision == "fail" and verdict.gate == "drift"
    assert "Jensen-Shannon" in verdict.reason and verdict.measured["drift_samples"] == 800
    off = Policy(soak_s=0, gates=Gates(max_drift=None))
    assert evaluate_wave(obs, off, now=10.0).decision == "pass"
    soaking = evaluate_wave(obs, Policy(soak_s=600), now=10.0)  # drift need not wait
    assert soaking.decision == "fail" and soaking.gate == "drift"
    calm = WaveObservation(**{**obs.__dict__, "quality": _obs()})
    assert evaluate_wave(calm, Policy(soak_s=600), now=10.0).decision == "wait"


def test_view_and_table_say_too_few_labels_and_mark_the_estimate():
    from edgeship.fleet.quality import model_view, table_rows

    windows = [_report("a", 2, [50, 50, 50, 50], above=150),
               _report("b", 1, [50, 50, 50, 50])]
    latest = [_report("a", 2, [1], labelled={"1": _counts(0.9, 300), "2": _counts(0.8, 20)})]
    view = model_view(windows, latest, ("a", "b", "c", "d"))
    assert list(view["versions"]) == ["2", "1"]
    rows = {r["version"]: r for r in table_rows(view)}
    assert rows["v2"]["accuracy"].startswith("too few labels (20")
    assert rows["v2"]["estimated accuracy"] == "~75.0% (estimate, n=200)"
    assert rows["v1"]["accuracy"].endswith("%]") and "[" in rows["v1"]["accuracy"]
    assert rows["v1"]["labels"] == "300" and rows["v1"]["f1"].count("[") == 1
    for key in ("precision", "recall"):  # macro precision and recall with their intervals
        value, lo, hi = (float(x) for x in
                         rows["v1"][key].replace("%", "").replace("[", "").replace("]", "")
                         .replace(",", "").split())
        assert lo < value < hi and hi - lo < 20
    drifted = summary(pool_windows([_report("a", 2, [400, 0, 0, 0], above=380)]))
    assert "far off" in drifted["estimate"]["note"] and drifted["estimate"]["accuracy"] == 0.95


def test_doc_estimates_pool_as_a_weighted_mean_and_name_their_method():
    # DoC reports its estimate times n (rounded) as "above": summing stays exact
    a = _report("a", 2, [100, 100, 100, 100], above=round(0.91 * 400), method="doc")
    b = _report("b", 2, [25, 25, 25, 25], above=round(0.71 * 100), method="doc")
    doc = summary(pool_windows([a, b]))["estimate"]
    assert doc["accuracy"] == pytest.approx((0.91 * 400 + 0.71 * 100) / 500)
    assert doc["method"] == "difference of confidences" and doc["is_estimate"]
    old = _report("c", 2, [25, 25, 25, 25], above=80)  # an agent from before DoC
    mixed = summary(pool_windows([a, old]))["estimate"]
    assert mixed["method"] == "average thresholded confidence + difference of confidences"


def _device_window(doc, logits, window=512):
    """What a device's telemetry says about ``logits`` served under profile ``doc``: the
    agent's own sketch and report (its drift section)."""
    from edgeship.agent.quality.drift import WindowSettings
    from edgeship.agent.quality.monitor import VersionSketch, VersionTracker
    from edgeship.agent.quality.profile import parse_profile

    p = parse_profile(doc)
    tracker = VersionTracker(1, "onnx-fp32", "classification", p.score,
                             VersionSketch(p, "onnx-fp32", WindowSettings(4, window // 4)),
                             ["x"])
    tracker.bind_outputs(["logits"])
    x = np.zeros((len(logits), 4), np.float32)
    tracker.fold([(i, 1, {"x": x[i:i + 1]}, [logits[i:i + 1]], tracker)
                  for i in range(len(logits))])
    return tracker.sketch.report()


def test_the_estimate_gate_halts_on_a_drop_in_the_agents_doc_estimate():
    from edgeship.agent.manifest import TensorSpec
    from edgeship.converter.profile import build_profile

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(512, 4)) * 4
    y = np.where(rng.random(512) < 0.9, logits.argmax(1), rng.integers(0, 4, 512))
    doc = build_profile({"x": np.zeros((512, 4), np.float32)}, [logits],
                        input_specs=[TensorSpec("x", "float32", (None, 4))],
                        output_specs=[TensorSpec("logits", "float32", (None, 4))],
                        task="classification", y=y)

    def version(v, scale, devices):
        reports = [QualityReport(d, 0.0, "m", v, {"version": v, "drift": _device_window(
            doc, logits[rng.permutation(512)] * scale)}) for d in devices]
        return version_quality(reports, [], v)
    old, same, unsure = version(1, 1.0, "c"), version(2, 1.0, "ab"), version(2, 0.25, "ab")
    assert same.estimate_methods == {"doc"} and unsure.estimate_n == 1024
    assert old.estimate - unsure.estimate > 0.10  # flatter scores: DoC falls
    measured: dict = {}
    failure = check(QualityObservation(unsure, old), Gates(max_drift=None).quality_limits(),
                    measured)
    assert failure is not None and failure.gate == "estimated_accuracy", measured
    assert check(QualityObservation(same, old), Gates(max_drift=None).quality_limits(),
                 {}) is None


def test_f1_interval_pools_confusion_counts_and_names_the_bound_for_older_agents():
    new = {"2": _counts(0.8, 300, 1)}
    old = {"2": {k: v for k, v in _counts(0.8, 300, 2).items() if k != "confusion"}}
    both_new = [_report(d, 2, [1], labelled=new) for d in "ab"]
    mixed = [both_new[0], _report("c", 2, [1], labelled=old)]
    views = [summary(version_quality([], reports, 2))["labelled"]
             for reports in (both_new, mixed)]
    assert [v["samples"] for v in views] == [600, 600]
    assert views[0]["f1_macro_ci_method"].startswith("delta method on the confusion matrix")
    assert "conservative bound" in views[1]["f1_macro_ci_method"]
    for v in views:
        lo, hi = v["f1_macro_ci"]
        assert lo < v["f1_macro"] < hi


def test_thin_classes_are_flagged_on_the_pooled_counts_and_shown_beside_macro_f1():
    from edgeship.fleet.quality import model_view, table_rows

    def device(name, rare):
        c = ClassCounts(3)
        for t, k in ((0, 150), (1, 60), (2, rare)):
            for _ in range(k):
                c.add(t, t)
        c.add(1, 0)
        return _report(name, 1, [1], labelled={"1": c.to_dict()})

    alone = summary(version_quality([], [device("a", 5)], 1))["labelled"]
    assert alone["thin_classes"] == 1 and "fewer than 8 labels" in alone["macro_note"]
    pooled = [device("a", 5), device("b", 5)]  # 5 + 5 labels of class 2: enough together
    together = summary(version_quality([], pooled, 1))["labelled"]
    assert together["samples"] == 2 * 216 and "macro_note" not in together
    assert "thin_classes" not in together
    thin = [device("a", 3), device("b", 4)]  # 7 labels of class 2 in all
    view = model_view([], thin)
    assert view["versions"]["1"]["labelled"]["thin_classes"] == 1
    (row,) = table_rows(view)
    assert row["f1"].count("[") == 1 and "macro intervals are approximate" in row["f1"]
    assert "approximate" not in row["accuracy"]
    (plain,) = table_rows(model_view([], pooled))
    assert "approximate" not in plain["f1"]
