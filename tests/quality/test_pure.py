"""Pure parts of model quality: signals, drift scores, the window, metrics, the profile."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeship.agent.errors import BundleError
from edgeship.agent.manifest import TensorSpec
from edgeship.agent.quality import drift, features, metrics
from edgeship.agent.quality.profile import parse_profile
from edgeship.converter.profile import atc_threshold, build_profile, quantile_edges
from tests.support import intervals


# --- signals ---------------------------------------------------------------------------

def test_signals_follow_the_input_kind_and_find_image_channels():
    names = [s.name for s in features.input_signals("img", "float32", (3, 32, 32))]
    assert names == ["img:mean", "img:std"] + [f"img:channel_mean[{c}]" for c in range(3)]
    nhwc = features.input_signals("img", "uint8", (32, 32, 3))
    assert [s.stat for s in nhwc] == ["mean", "zeros"]  # integers: no channel means
    assert features.channel_axis((32, 32, 3)) == 2
    assert features.channel_axis((1, 8, 8)) is None  # one channel: the mean says it all
    assert features.channel_axis((None, 8, 8)) is None
    assert [s.stat for s in features.input_signals("ids", "int64", (128,))] == ["mean", "zeros"]
    assert [s.stat for s in features.input_signals("mask", "bool", (128,))] == ["mean"]


def test_input_columns_are_per_sample_statistics():
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 4, 4)).astype(np.float32)
    specs = features.input_signals("x", "float32", x.shape[1:])
    cols = features.input_columns(x, specs)
    flat = x.reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(cols[0], flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(cols[1], flat.std(1), rtol=1e-4)
    np.testing.assert_allclose(cols[2], x[:, 0].reshape(5, -1).mean(1), rtol=1e-6)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    spec = features.SignalSpec("c", "channel_mean", "x", axis=2, channel=1)
    np.testing.assert_allclose(features.input_columns(nhwc, [spec])[0], cols[3], rtol=1e-6)
    ids = np.array([[0, 0, 5, 7], [1, 2, 3, 0]], dtype=np.int64)
    zeros = features.SignalSpec("z", "zeros", "ids")
    np.testing.assert_allclose(features.input_columns(ids, [zeros])[0], [0.5, 0.25])


def test_large_samples_are_read_at_a_stride_and_stay_close():
    x = np.random.default_rng(1).random((2, 3, 320, 320)).astype(np.float32)
    specs = features.input_signals("x", "float32", x.shape[1:])
    cols = features.input_columns(x, specs)
    assert np.abs(cols[0] - x.reshape(2, -1).mean(1)).max() < 0.02
    assert np.abs(cols[2] - x[:, 0].reshape(2, -1).mean(1)).max() < 0.02


@pytest.mark.parametrize("scores,kind", [
    (np.array([[2.0, -1.0, 0.5]]), "logits"),
    (np.array([[0.7, 0.2, 0.1]]), "probabilities"),
    (np.array([[0.8], [0.1]]), "sigmoid_probability"),
    (np.array([[3.0], [-2.0]]), "sigmoid_logit"),
])
def test_score_kind_and_probabilities(scores, kind):
    assert features.score_kind(scores) == kind
    p = features.class_probabilities(scores, kind)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p.shape[1] == max(2, scores.shape[1])
    h = features.entropy(p)
    assert ((0 <= h) & (h <= 1 + 1e-12)).all()


# --- drift -----------------------------------------------------------------------------

def test_js_distance_is_zero_for_the_reference_one_for_disjoint_and_symmetric_bounded():
    ref = np.array([0.25, 0.25, 0.5])
    assert drift.js_distance(np.array([25, 25, 50]), ref) == pytest.approx(0.0, abs=1e-9)
    assert drift.js_distance(np.array([0, 0, 0]), ref) is None
    assert drift.js_distance(np.array([10, 0, 0]), np.array([0.0, 0.5, 0.5])) == \
        pytest.approx(1.0)
    # finite where PSI needs its smoothing constant (an empty live bin)
    assert 0 < drift.js_distance(np.array([0, 50, 50]), ref) < 1
    assert drift.psi(np.array([0, 50, 50]), ref) > 0.25


def test_chance_level_matches_sampling_without_drift():
    rng = np.random.default_rng(3)
    ref = np.full(10, 0.1)
    observed = [drift.js_distance(np.bincount(rng.integers(0, 10, 500), minlength=10), ref)
                for _ in range(300)]
    expected = drift.chance_js(10, 500, 0)
    assert 0.7 * expected < float(np.mean(observed)) < 1.3 * expected


def test_window_is_constant_memory_and_forgets_old_blocks():
    win = drift.SlidingWindow([3, 2], drift.WindowSettings(blocks=4, block_samples=10))
    size = win.nbytes
    old = np.zeros((40, 2), dtype=np.int64)  # 40 samples all in bin 0
    win.add(old, np.ones(40, bool))
    n, counts, above = win.totals()
    assert (n, counts[0].tolist(), counts[1].tolist(), above) == (40, [40, 0, 0], [40, 0], 40)
    win.add(np.array([[2, 1]] * 25), np.zeros(25, bool))  # new traffic, other bins
    n, counts, above = win.totals()
    assert n == 35 and counts[0][2] == 25 and counts[0][0] == 10 and above == 10
    win.add(np.array([[2, 1]] * 1000), None)
    n, counts, _ = win.totals()
    assert counts[0][0] == 0 and n <= 40 and win.nbytes == size and win.total == 1065


def test_window_confidence_sum_covers_the_same_samples_as_the_counts():
    win = drift.SlidingWindow([2], drift.WindowSettings(blocks=4, block_samples=10))
    win.add(np.zeros((40, 1), np.int64), None, np.full(40, 0.9))
    assert win.confidence_sum == pytest.approx(36.0)
    win.add(np.zeros((25, 1), np.int64), None, np.full(25, 0.5))  # evicts 3 old blocks
    n, _, _ = win.totals()
    assert n == 35 and win.confidence_sum == pytest.approx(10 * 0.9 + 25 * 0.5)


def test_bins_put_edges_in_the_upper_bin():
    edges = np.array([0.0, 1.0])
    assert drift.bin_indices(np.array([-1, 0, 0.5, 1, 2]), edges).tolist() == [0, 1, 1, 2, 2]


# --- metrics ---------------------------------------------------------------------------

def test_class_counts_match_sklearn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, truth, rng.integers(0, 4, 300))
    c = metrics.ClassCounts(4)
    for p, t in zip(pred, truth):
        c.add(int(p), int(t))
    rep = metrics.classification_report(c, ("a", "b", "c", "d"))
    p, r, f, _ = precision_recall_fscore_support(truth, pred, average="macro")
    assert rep["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert (rep["precision_macro"], rep["recall_macro"], rep["f1_macro"]) == \
        pytest.approx((p, r, f))
    lo, hi = rep["accuracy_ci"]
    assert lo < rep["accuracy"] < hi and hi - lo < 0.12
    assert [row["class"] for row in rep["per_class"]] == ["a", "b", "c", "d"]
    merged = metrics.pooled([metrics.ClassCounts.from_dict(c.to_dict()), c])
    assert merged.n == 600 and metrics.report(merged)["accuracy"] == rep["accuracy"]


def test_wilson_interval_known_values_and_regression_report():
    lo, hi = metrics.wilson(81, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.7222, 0.8749)
    assert metrics.wilson(0, 0) is None
    r = metrics.RegressionCounts()
    for p, t in [(1.0, 2.0), (3.0, 1.0), (0.0, 0.0)]:
        r.add(p, t)
    rep = metrics.regression_report(r)
    assert rep["mae"] == pytest.approx(1.0) and rep["rmse"] == pytest.approx(math.sqrt(5 / 3))


@pytest.fixture(scope="module")
def coverage_by_family():
    """6,300 simulated draws (at least 600 per family) over 2/3/10/30 classes, balanced and 10:1, accuracy 0.7–0.99,
    200–5,000 labels (cases whose rarest class expects >= 8 labels), one seed."""
    cases = list(intervals.grid(min_rarest=8))
    return {keep: intervals.coverage(cases, 50, 17, intervals.product_intervals(keep))
            for keep in (True, False)}


@pytest.mark.parametrize("keep_confusion", [True, False], ids=["confusion", "bound"])
def test_macro_intervals_cover_the_truth_about_95_percent_in_every_family(
        coverage_by_family, keep_confusion):
    cov = coverage_by_family[keep_confusion]
    assert len(cov) == 8 * 3 and min(b for _, b in cov.values()) >= 600
    low = {k: a / b for k, (a, b) in cov.items() if not 0.93 <= a / b <= 0.99}
    assert not low, low


def test_f1_interval_is_exact_with_the_confusion_matrix_and_a_bound_without():
    rng = np.random.default_rng(4)
    cells = rng.multinomial(600, intervals.Case(3, "balanced", 0.8, 600, "uniform")
                            .cells().ravel()).reshape(3, 3)
    full, no = intervals.counts_of(cells), intervals.counts_of(cells, keep_confusion=False)
    (f1, se), (f1_b, se_b) = metrics.macro_f1(full), metrics.macro_f1(no)
    assert f1 == f1_b and se < se_b <= se * math.sqrt(2)
    # the exact variance is the delta method's: numeric gradient over the cells
    base = cells.astype(np.float64)

    def value(m):
        return metrics.macro_f1(intervals.counts_of(m))[0]
    grad = np.zeros_like(base)
    for i, j in np.ndindex(*base.shape):
        up = base.copy()
        up[i, j] += 1e-4
        grad[i, j] = (value(up) - value(base)) / 1e-4
    assert se == pytest.approx(math.sqrt(float((base * grad ** 2).sum())), rel=0.05)
    assert metrics.classification_report(full)["f1_macro_ci_method"] == \
        metrics.F1_METHODS["confusion"]
    assert metrics.classification_report(no)["f1_macro_ci_method"] == \
        metrics.F1_METHODS["bound"]


def test_a_version_with_no_errors_still_gets_an_f1_interval_below_one():
    c = metrics.ClassCounts(3)
    for t in [0] * 150 + [1] * 40 + [2] * 10:
        c.add(t, t)
    lo, hi = metrics.classification_report(c)["f1_macro_ci"]
    assert hi == pytest.approx(1.0) and 0.9 < lo < 0.99


def test_confusion_counts_round_trip_pool_and_fall_back_for_older_reports():
    c = metrics.ClassCounts(3)
    for p, t in [(0, 0), (1, 0), (2, 1), (1, 1), (1, 0)]:
        c.add(p, t)
    doc = c.to_dict()
    assert doc["confusion"] == [[0, 1, 2], [1, 2, 1]]  # wrong predictions only
    again = metrics.ClassCounts.from_dict(doc)
    assert again.confusion is not None and (again.confusion == c.confusion).all()
    old = {k: v for k, v in doc.items() if k != "confusion"}  # an agent before this
    assert metrics.ClassCounts.from_dict(old).confusion is None
    both = metrics.pooled([again, metrics.ClassCounts.from_dict(doc)])
    assert both.confusion is not None and int(both.confusion[0, 1]) == 4
    mixed = metrics.pooled([again, metrics.ClassCounts.from_dict(old)])
    assert mixed.confusion is None and mixed.n == 10
    assert metrics.report(mixed)["f1_macro_ci_method"] == metrics.F1_METHODS["bound"]
    empty_old = {k: v for k, v in metrics.ClassCounts(3).to_dict().items() if k != "confusion"}
    fresh = metrics.ClassCounts.from_dict(empty_old)
    assert fresh.confusion is not None  # nothing counted yet: keeps one from now on
    for bad in ([[0, 0, 1]], [[0, 1, 1]], [[0, 5, 2]], [[1, 0, -2]]):
        with pytest.raises(ValueError):
            metrics.ClassCounts.from_dict({**doc, "confusion": bad})


def _labelled(support: list[int], wrong: tuple[int, int] | None = None) -> metrics.ClassCounts:
    """Counts with ``support[c]`` right labels of class c, and one wrong prediction."""
    c = metrics.ClassCounts(len(support))
    for t, k in enumerate(support):
        for _ in range(k):
            c.add(t, t)
    if wrong:
        c.add(*wrong)
    return c


def test_macro_metrics_carry_a_note_exactly_when_a_seen_class_has_under_8_labels():
    from edgeship.agent.quality.cli import describe

    enough = metrics.classification_report(_labelled([50, 20, 8, 0]))  # class 3 never seen
    assert "thin_classes" not in enough and "macro_note" not in enough
    thin = metrics.classification_report(_labelled([50, 20, 7, 0]))
    assert thin["thin_classes"] == 1
    assert thin["macro_note"].startswith("1 class has fewer than 8 labels: macro intervals")
    assert "0.91 with such classes" in thin["macro_note"]
    # a class only ever predicted (0 labels) counts; so does a true class seen once
    only_predicted = metrics.classification_report(_labelled([50, 20, 8, 0], wrong=(3, 0)))
    assert only_predicted["thin_classes"] == 1
    two = metrics.classification_report(_labelled([50, 1, 8, 0], wrong=(3, 0)))
    assert two["thin_classes"] == 2 and two["macro_note"].startswith("2 classes have")
    lines = describe({"version": 1, "variant": "a", "profile": "x",
                      "metrics": {"1": thin, "2": enough}})
    assert "macro intervals are approximate" in lines[1] and "(1 class has" in lines[1]
    assert "approximate" not in lines[2] and metrics.macro_note(enough) == ""


def test_many_classes_keep_no_confusion_and_use_the_bound():
    k = metrics.CONFUSION_MAX_CLASSES
    c = metrics.ClassCounts(k)
    c.add(k + 3, 0)  # grows past the limit
    assert c.confusion is None and "confusion" not in c.to_dict()
    small = metrics.ClassCounts(4)
    small.add(1, 0)
    small.merge(c)
    assert small.confusion is None and small.classes == k + 4


def test_comparison_and_sample_size_for_a_two_point_drop():
    same = metrics.compare(0.98, 0.004, 0.98, 0.004, margin=0.0, confidence=0.95)
    assert not same.worse
    worse = metrics.compare(0.98, 0.004, 0.93, 0.008, margin=0.0, confidence=0.95)
    assert worse.worse and worse.drop == pytest.approx(0.05)
    both = metrics.samples_to_detect(0.98, 0.02)
    fixed = metrics.samples_to_detect(0.98, 0.02, old_n=100_000)
    assert 800 < both < 1000 and 550 < fixed < 650  # the Wald test the gate runs


# --- profile ---------------------------------------------------------------------------

def _profile(y=None):
    rng = np.random.default_rng(0)
    x = rng.random((300, 3, 8, 8)).astype(np.float32)
    logits = rng.normal(size=(300, 4)) * 3
    return build_profile({"x": x}, [logits],
                         input_specs=[TensorSpec("x", "float32", (None, 3, 8, 8))],
                         output_specs=[TensorSpec("logits", "float32", (None, 4))],
                         task="classification", labels=("a", "b", "c", "d"), y=y), logits


def test_profile_round_trips_and_its_threshold_reproduces_the_accuracy():
    rng = np.random.default_rng(1)
    _, logits = _profile()
    y = np.where(rng.random(300) < 0.75, logits.argmax(1), rng.integers(0, 4, 300))
    doc, _ = _profile(y)
    p = parse_profile(doc)
    names = [s.spec.name for s in p.signals]
    assert names[:5] == ["x:mean", "x:std", "x:channel_mean[0]", "x:channel_mean[1]",
                         "x:channel_mean[2]"]
    assert names[5:] == ["confidence", "entropy", "class"]
    est = p.estimator("onnx-fp32")
    probs = features.class_probabilities(logits, "logits")
    share = (features.atc_scores(probs, est.score) > est.threshold).mean()
    assert share == pytest.approx(est.accuracy, abs=1 / 300)
    assert est.accuracy == pytest.approx((logits.argmax(1) == y).mean())
    for s in p.signals:  # reference shares are the validation histogram itself
        assert s.ref.sum() == pytest.approx(1.0)


def _tracker(doc, variant="onnx-fp32"):
    from edgeship.agent.quality.monitor import VersionSketch, VersionTracker

    p = parse_profile(doc)
    tracker = VersionTracker(1, variant, "classification", p.score,
                             VersionSketch(p, variant, drift.WindowSettings()), ["x"])
    tracker.bind_outputs(["logits"])
    return tracker


def _served_estimate(doc, x, logits):
    tracker = _tracker(doc)
    tracker.fold([(i, 1, {"x": x[i:i + 1]}, [logits[i:i + 1]], tracker)
                  for i in range(len(x))])
    return tracker.sketch.report()["estimate"]


def test_doc_estimate_is_validation_accuracy_plus_the_confidence_change():
    rng = np.random.default_rng(1)
    _, logits = _profile()
    y = np.where(rng.random(300) < 0.75, logits.argmax(1), rng.integers(0, 4, 300))
    doc, _ = _profile(y)
    est = parse_profile(doc).estimator("onnx-fp32")
    probs = features.class_probabilities(logits, "logits")
    assert est.method == "doc" and est.mean_confidence == pytest.approx(probs.max(1).mean())
    x = rng.random((300, 3, 8, 8)).astype(np.float32)
    same = _served_estimate(doc, x, logits)  # the validation outputs again: no change
    assert same["method"] == "doc" and same["accuracy"] == pytest.approx(est.accuracy)
    assert same["atc"]["accuracy"] == pytest.approx(est.accuracy, abs=1 / 300)
    unsure = _served_estimate(doc, x, logits / 4)  # flatter scores: less confident
    drop = probs.max(1).mean() - features.class_probabilities(logits / 4, "logits").max(1).mean()
    assert unsure["accuracy"] == pytest.approx(est.accuracy - drop)
    assert unsure["above"] == round(unsure["accuracy"] * 300)  # what the fleet pools
    assert unsure["mean_confidence"] == pytest.approx(est.mean_confidence - drop)


def test_a_profile_without_mean_confidence_still_loads_and_estimates_with_atc():
    rng = np.random.default_rng(2)
    _, logits = _profile()
    y = np.where(rng.random(300) < 0.75, logits.argmax(1), rng.integers(0, 4, 300))
    doc, _ = _profile(y)
    doc["estimate"].pop("mean_confidence")  # a bundle written before DoC
    for v in doc["estimate"].get("variants", {}).values():
        v.pop("mean_confidence")
    est = parse_profile(doc).estimator("onnx-fp32")
    assert est.method == "atc" and est.mean_confidence is None
    x = rng.random((300, 3, 8, 8)).astype(np.float32)
    old = _served_estimate(doc, x, logits / 4)
    share = (features.atc_scores(features.class_probabilities(logits / 4, "logits"),
                                 est.score) > est.threshold).mean()
    assert old["method"] == "atc" and old["accuracy"] == pytest.approx(share)
    assert "atc" not in old and old["above"] == round(share * 300)


def test_atc_threshold_handles_perfect_and_useless_models():
    s = np.array([0.1, 0.5, 0.9])
    t, acc = atc_threshold(s, np.array([True, True, True]))
    assert acc == 1 and (s > t).all()
    t, acc = atc_threshold(s, np.array([False, False, False]))
    assert acc == 0 and not (s > t).any()


def test_quantile_edges_cover_constant_and_out_of_range_values():
    edges = quantile_edges(np.full(50, 3.0))
    assert drift.bin_indices(np.array([2.0, 3.0, 4.0]), edges).tolist() == [0, 1, 2]
    edges = quantile_edges(np.linspace(0, 1, 101))
    assert len(edges) == 11 and edges[0] == 0.0 and edges[-1] > 1.0


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format=9), "unknown format"),
    (lambda d: d["signals"][0].update(edges=d["signals"][0]["edges"][::-1]),
     "strictly increasing"),
    (lambda d: d["signals"][0].update(ref=[1.0]), "one edge fewer"),
    (lambda d: d["signals"][0].update(stat="median"), "unknown signal stat"),
    (lambda d: d["signals"].append(dict(d["signals"][0])), "repeats a signal"),
    (lambda d: d["score"].update(kind="odds"), "score kind"),
    (lambda d: d["estimate"].update(accuracy=1.5), r"accuracy in \[0, 1\]"),
    (lambda d: d["estimate"].update(mean_confidence=0.0), r"mean_confidence must be in"),
    (lambda d: d["estimate"].update(mean_confidence=float("nan")), r"mean_confidence"),
])
def test_bad_profiles_are_refused_with_a_reason(change, message):
    doc, _ = _profile(np.zeros(300, dtype=np.int64))
    change(doc)
    with pytest.raises(BundleError, match=message):
        parse_profile(doc)
