"""Model quality on the dashboard, in a real headless Chromium, with real agents: accuracy
and F1 with their intervals once there are enough labels, "no labels yet" for a cohort
without any, the estimate marked as one, drift over time; the REST route, its OpenAPI
entry and the Prometheus families behind it. The screenshot goes to
``$EDGESHIP_TEST_OUTPUT`` (default ``test-output/``) ``/screenshots/dashboard-quality.png``."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from edgeship.agent.quality.metrics import ClassCounts, classification_report
from edgeship.fleet.auth import Role, TokenStore
from edgeship.fleet.web.server import FleetWebServer, WebSettings
from tests.support import wait_until
from tests.support.browser import ARGS, CHROMIUM, needs_chromium, screenshot_dir, sign_in
from tests.support.shifts import Traffic, noise, rotate

def _json(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _thin_version() -> dict:
    """A version's summary whose labels include a class seen 5 times (rendered in the page)."""
    c = ClassCounts(3)
    for t, k in ((0, 150), (1, 60), (2, 5)):
        for _ in range(k):
            c.add(t, t)
    return {"devices": 1, "labelled": classification_report(c),
            "estimate": {"accuracy": None, "note": None}, "drift": {"js": None}}


@needs_chromium
def test_dashboard_shows_quality_honestly(loop_env, digits_bundles):
    playwright = pytest.importorskip("playwright.sync_api")
    data = digits_bundles["trained"].data
    x, y = data.x_test, data.y_test
    shifted = noise(rotate(x, 30), 0.15)
    agents = [loop_env.start_agent(n) for n in ("pi-north", "pi-south")]
    loop_env.release(digits_bundles[1].bundle_dir)
    for a in agents:
        loop_env.wait_serving(a.device, 1)
    registry = loop_env.fleet.registry
    registry.set_group("pi-north", "north")
    registry.set_group("pi-south", "south")
    rng = np.random.default_rng(0)

    def source(i):  # north: plain digits, labelled; south: rotated and noised, no labels
        k = int(rng.integers(0, len(x)))
        return (x[k:k + 1], y[k:k + 1]) if i == 0 else (shifted[k:k + 1], None)

    web = FleetWebServer(loop_env.fleet, WebSettings())
    web.start()
    token = TokenStore(registry).create("viewer", Role.READ)[1]
    traffic = Traffic(agents, "digits", source, feedback_batch=25)
    try:
        wait_until(lambda: traffic.labelled[0] >= 250, timeout_s=60, what="labels")
        wait_until(lambda: (_json(f"{web.url}/api/v1/quality/digits", token)["versions"]
                            .get("1", {}).get("labelled", {}).get("samples", 0) >= 250),
                   timeout_s=30, what="labels in the registry")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            sign_in(page, web.url, token)
            row = "[data-quality-version='1']"
            page.wait_for_selector(f"{row} [data-accuracy]:has-text('%')", timeout=30_000)
            page.wait_for_selector("#q-drift svg circle", timeout=30_000)
            everyone = page.inner_text(row)
            intervals = [page.inner_text(f"{row} [data-{k}]") for k in ("precision", "recall")]
            f1_text = page.inner_text(f"{row} [data-f1]")
            thin_row = page.evaluate("([v, d]) => qualityRow(v, d)", ["9", _thin_version()])
            shot = screenshot_dir() / "dashboard-quality.png"
            page.screenshot(path=str(shot), full_page=True)
            page.fill("#q-group", "south")
            page.wait_for_selector(f"{row} [data-note]:has-text('no labels yet')",
                                   timeout=30_000)
            south = page.inner_text(row)
            page.screenshot(path=str(screenshot_dir() / "dashboard-quality-south.png"),
                            full_page=True)
            browser.close()
        api = f"{web.url}/api/v1/quality/digits"
        south_doc = _json(f"{api}?group=south", token)["versions"]["1"]
        spec = _json(f"{web.url}/openapi.json", token)

        def north_and_metrics():  # one snapshot: no label report lands between the two reads
            before = _json(f"{api}?group=north", token)["versions"]["1"]
            req = urllib.request.Request(f"{web.url}/metrics",
                                         headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                metrics = resp.read().decode()
            after = _json(f"{api}?group=north", token)["versions"]["1"]
            return (after, metrics) if after["labelled"] == before["labelled"] else None

        north_doc, metrics = wait_until(north_and_metrics, timeout_s=30,
                                        what="the same labelled counts before and after /metrics")
    finally:
        traffic.stop()
        web.stop()
    assert "[" in everyone and "(estimate, n=" in everyone  # interval; estimate marked
    assert all("%" in t and "[" in t for t in intervals)  # macro precision/recall with CIs
    # ~25 labels a class: no note; a class under 8 labels: the note beside the macro metrics
    assert "[" in f1_text and "approximate" not in f1_text
    assert thin_row.count("data-macro-note") == 1 and thin_row.count("≈") == 3
    assert "1 class has fewer than 8 labels: macro intervals are approximate" in thin_row
    for key in ("precision_macro", "recall_macro"):
        lo, hi = north_doc["labelled"][f"{key}_ci"]
        assert lo < north_doc["labelled"][key] < hi
    assert north_doc["estimate"]["method"] == "difference of confidences"
    assert "no labels yet" in south and shot.stat().st_size > 10_000
    assert south_doc["labelled"] == {"samples": 0, "note": "no labels yet"}
    assert south_doc["drift"]["js"] > 0.25 > north_doc["drift"]["js"]
    assert "far off" in south_doc["estimate"]["note"]  # an estimate under drift is flagged
    lo, hi = north_doc["labelled"]["accuracy_ci"]
    assert lo < north_doc["labelled"]["accuracy"] < hi and north_doc["estimate"]["is_estimate"]
    assert "/api/v1/quality/{model}" in spec["paths"]
    assert spec["paths"]["/api/v1/quality/{model}"]["get"]["x-required-role"] == "read"
    assert 'edgeship_fleet_quality_accuracy{group="north",model="digits",version="1"}' \
        in metrics
    assert 'edgeship_fleet_quality_estimated_accuracy{group="",model="digits",version="1"}' \
        in metrics
    assert 'edgeship_fleet_quality_accuracy{group="south"' not in metrics  # no labels there
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        low = float(metrics.split(f'edgeship_fleet_quality_{key}_ci_low{{group="north",'
                                  f'model="digits",version="1"}} ')[1].split()[0])
        assert low == pytest.approx(north_doc["labelled"][f"{key}_ci"][0])
