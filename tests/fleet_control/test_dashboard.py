"""The dashboard in a real headless Chromium: a rollout advances wave by wave on the page;
the REST API it runs on has an OpenAPI schema; /metrics speaks Prometheus."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from edgeship.fleet.rollout import Gates, Policy
from edgeship.fleet.rollout_runner import start_rollout
from edgeship.fleet.web.server import FleetWebServer
from tests.fleet_control.helpers import WIDTH, Traffic
from tests.support import wait_until

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def _get(url: str, data: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def web(loop_env):
    server = FleetWebServer(loop_env.fleet, "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def test_rest_api_openapi_and_metrics(loop_env, web):
    status, body = _get(f"{web.url}/openapi.json")
    spec = json.loads(body)
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "/api/v1/rollouts/{id}/abort" in spec["paths"]
    loop_env.fleet.registry.upsert_presence("pi-1", {"online": True,
                                                     "models": {"m": {"version": 1}}})
    status, body = _get(f"{web.url}/api/v1/devices/pi-1/tags", {"add": ["lab"],
                                                                "group": "north"})
    assert status == 200 and json.loads(body)["group"] == "north"
    assert [d["id"] for d in json.loads(_get(f"{web.url}/api/v1/devices?tag=lab")[1])] == \
        ["pi-1"]
    status, body = _get(f"{web.url}/api/v1/rollouts", {"model": "m", "version": 7})
    assert status == 400 and "never released" in json.loads(body)["error"]
    assert _get(f"{web.url}/api/v1/rollouts/nope")[0] == 404
    assert _get(f"{web.url}/api/v1/rollouts/nope/pause", {})[0] == 404
    status, body = _get(f"{web.url}/metrics")
    text = body.decode()
    assert status == 200 and 'edgeship_devices{online="true"} 1.0' in text
    assert 'edgeship_devices_running{model="m",version="1"} 1.0' in text
    assert "edgeship_fleet_bytes_sent_total" in text


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
def test_dashboard_shows_a_rollout_advance(loop_env, web, synth_bundles, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    from tests.support.synthetic import sample_inputs
    names = ["pi-1", "pi-2"]
    agents = [loop_env.start_agent(n) for n in names]
    loop_env.release(synth_bundles[1])
    for n in names:
        loop_env.wait_serving(n, 1)
    registry = loop_env.fleet.registry
    info = loop_env.release(synth_bundles[3], announce=False)
    registry.add_release("synth", info.version, info.released_at, "test")
    traffic = Traffic(agents, "synth", sample_inputs(WIDTH))
    try:
        wait_until(lambda: len(registry.version_stats("synth", 1, 0)) == 2, what="telemetry")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(web.url)
            page.wait_for_selector("#chart-latency svg path", timeout=30_000)
            policy = Policy(waves=(0.5, 1.0), soak_s=1, jitter_s=0, wave_timeout_s=90,
                            gates=Gates(min_requests=10, max_latency_ratio=3.0))
            rollout = start_rollout(registry, model="synth", version=3, policy=policy,
                                    actor="test")
            card = f"[data-rollout-id='{rollout.id}']"
            page.wait_for_selector(f"{card} [data-wave='1'][data-status='passed']",
                                   timeout=90_000)
            page.wait_for_selector(f"{card}[data-state='done']", timeout=90_000)
            page.wait_for_selector("#chart-latency path[data-version='v3']", timeout=30_000)
            shot = Path(os.environ.get("EDGESHIP_SCREENSHOT_DIR", tmp_path)) / \
                "dashboard-rollout.png"
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text(card)
            browser.close()
    finally:
        traffic.stop()
    assert "2/2 moved" in text and shot.stat().st_size > 10_000
