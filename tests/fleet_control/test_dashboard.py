"""The dashboard in a real headless Chromium: a rollout advances wave by wave on the page
(real agents); at 10,000 registry rows the devices table pages, filters and sorts on the
server, re-reads nothing unchanged (ETag 304), and rollouts name the devices a wave waits
on, offline ones with their deadline. Screenshots go to $EDGESHIP_TEST_OUTPUT (default
test-output/) /screenshots. Also: the REST API, its OpenAPI schema and /metrics."""

from __future__ import annotations

import dataclasses
import json
import random
import urllib.request

import pytest

from edgeship.fleet import schema
from edgeship.fleet.auth import Role, TokenStore
from edgeship.fleet.rollout import Gates, Policy
from edgeship.fleet.rollout_runner import RolloutRunner, start_rollout
from edgeship.fleet.web.server import FleetWebServer, WebSettings
from tests.fleet_control.helpers import WIDTH, Traffic
from tests.fleet_control.web import start_web, stop_web
from tests.support import wait_until
from tests.support.browser import ARGS, CHROMIUM, needs_chromium, screenshot_dir, sign_in


def _call(url: str, token: str, data: dict | None = None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def web(loop_env):
    server = FleetWebServer(loop_env.fleet, WebSettings())
    server.start()
    server.token = TokenStore(loop_env.fleet.registry).create("ops", Role.OPERATE)[1]
    yield server
    server.stop()


def test_rest_api_openapi_and_metrics(loop_env, web):
    tok = web.token
    status, body = _call(f"{web.url}/openapi.json", tok)
    spec = json.loads(body)
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "/api/v1/rollouts/{id}/abort" in spec["paths"]
    loop_env.fleet.registry.upsert_presence("pi-1", {"online": True,
                                                     "models": {"m": {"version": 1}}})
    status, body = _call(f"{web.url}/api/v1/devices/pi-1/tags", tok, {"add": ["lab"],
                                                                       "group": "north"})
    assert status == 200 and json.loads(body)["group"] == "north"
    page = json.loads(_call(f"{web.url}/api/v1/devices?tag=lab", tok)[1])
    assert page["total"] == 1 and [d["id"] for d in page["items"]] == ["pi-1"]
    status, body = _call(f"{web.url}/api/v1/rollouts", tok, {"model": "m", "version": 7})
    assert status == 400 and "never released" in json.loads(body)["error"]
    assert _call(f"{web.url}/api/v1/rollouts/nope", tok)[0] == 404
    assert _call(f"{web.url}/api/v1/rollouts/nope/pause", tok, {})[0] == 404
    status, body = _call(f"{web.url}/metrics", tok)
    text = body.decode()
    assert status == 200 and 'edgeship_devices{online="true"} 1.0' in text
    assert 'edgeship_devices_running{model="m",version="1"} 1.0' in text
    assert "edgeship_fleet_bytes_sent_total" in text


@needs_chromium
def test_dashboard_shows_a_rollout_advance(loop_env, web, synth_bundles):
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
            sign_in(page, web.url, web.token)
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
            shot = screenshot_dir() / "dashboard-rollout.png"
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text(card)
            browser.close()
    finally:
        traffic.stop()
    assert "2/2 told to update" in text and "2/2 serving v3" in text
    assert shot.stat().st_size > 10_000


# --- 10,000 registry rows ---------------------------------------------------------------------

N = 10_000
PROFILES = ("rpi4", "rpi5", "jetson-orin-nano", "pi-zero-2w", "generic-x86_64")


def _fill(registry, now: float) -> None:
    rng = random.Random(7)
    rows = [{"id": f"dev-{i:05d}", "online": int(i % 10 != 3), "last_seen": now - rng.uniform(0, 900),
             "profile": PROFILES[i % len(PROFILES)], "arch": "aarch64",
             "models": json.dumps({"digits": {"version": 1 if i % 4 else 2}}),
             "cpu_percent": rng.uniform(1, 95), "memory_percent": rng.uniform(10, 90),
             "temperature_c": rng.uniform(35, 84), "vitals_ts": now,
             "last_failure": "health_check_failed" if i % 97 == 0 else None,
             "last_failure_ts": now - 60 if i % 97 == 0 else None}
            for i in range(N)]
    rows[4242]["temperature_c"] = 91.5  # the hottest
    with registry.db.write() as conn:
        conn.execute(schema.devices.insert(), rows)
    registry.add_release("digits", 2, now, "test")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    web = start_web(tmp_path_factory.mktemp("big") / "fleet.db",
                    WebSettings(idle_timeout_s=30))
    now = web.registry.now()
    _fill(web.registry, now)
    yield web
    stop_web(web)


def _offline_rollout(registry):
    """A rollout whose first wave has an offline device: the runner ticks (its publisher
    is a list: no broker here), two devices report serving, one stays offline."""
    policy = Policy(waves=(0.001, 1.0), jitter_s=0, soak_s=0, offline="skip",
                    offline_grace_s=600, gates=Gates(min_requests=0))
    rollout = start_rollout(registry, model="digits", version=2, policy=policy,
                            actor="test", from_version=1)
    sent: list = []
    runner = RolloutRunner(registry, lambda device, desired: sent.append(device))
    runner.tick()
    wave = rollout.waves[0]
    for device in wave[:2]:
        registry.add_event(device, {"event": "serving", "model": "digits", "version": 2})
    registry.upsert_presence(wave[2], {"online": False})
    runner.tick()
    assert set(sent) == set(wave)
    return rollout, wave


@needs_chromium
def test_dashboard_at_10000_devices(big):
    playwright = pytest.importorskip("playwright.sync_api")
    rollout, wave = _offline_rollout(big.registry)
    out = screenshot_dir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        statuses: list[tuple[str, int]] = []
        page.on("response", lambda r: statuses.append((r.url, r.status)))
        sign_in(page, f"http://127.0.0.1:{big.port}/", big.tokens["operate"])
        page.wait_for_selector("#device-table tr[data-device]", timeout=30_000)
        assert page.inner_text("#page") == f"1–50 of {N}"
        assert page.inner_text("#k-devices") == str(N)
        assert page.locator("#device-table tr[data-device]").count() == 50
        card = f"[data-rollout-id='{rollout.id}']"
        page.wait_for_selector(f"{card} [data-waiting]", timeout=30_000)
        waiting = page.inner_text(f"{card} [data-waiting]")
        offline = page.inner_text(f"{card} [data-offline]")
        summary = page.inner_text(card)
        page.screenshot(path=str(out / "dashboard-10k-overview.png"), full_page=False)

        page.click("th[data-sort='temperature']")  # ascending, then descending
        page.click("th[data-sort='temperature']")
        page.wait_for_selector("#device-table tr[data-device='dev-04242']:nth-child(2)",
                               timeout=30_000)
        page.screenshot(path=str(out / "dashboard-10k-hottest-first.png"), full_page=False)

        expected = big.call("GET", "/api/v1/devices?online=false&failing=true",
                            token=big.tokens["read"]).json()["total"]
        assert 0 < expected == sum(1 for i in range(N) if i % 10 == 3 and i % 97 == 0)
        page.select_option("#f-online", "false")
        page.check("#f-failing")
        page.wait_for_function("() => document.querySelector('#page').textContent"
                               f".endsWith(' of {expected}')", timeout=30_000)
        rows = page.locator("#device-table tr[data-device]")
        assert rows.count() == expected
        assert "health_check_failed" in rows.first.inner_text()
        page.screenshot(path=str(out / "dashboard-10k-offline-failing.png"), full_page=True)
        page.fill("#f-q", "dev-0424")
        page.select_option("#f-online", "")
        page.uncheck("#f-failing")
        page.wait_for_function("() => document.querySelector('#page').textContent === "
                               "'1–10 of 10'", timeout=30_000)
        page.wait_for_timeout(4500)  # two more polls: unchanged answers are 304s
        text = page.inner_text("body")
        browser.close()
    assert "installing: 2/10 reported; waiting on" in waiting and wave[2] in waiting
    assert "offline" in waiting and "then skipped" in waiting
    assert wave[2] in offline and "deadline" in offline
    assert f"2/{N} serving v2" in summary and "told to update" in summary
    assert "vNone" not in text and "vnull" not in text and "vundefined" not in text
    api = [s for u, s in statuses if "/api/v1/devices" in u]
    assert 304 in api and 200 in api
    for name in ("overview", "hottest-first", "offline-failing"):
        assert (out / f"dashboard-10k-{name}.png").stat().st_size > 10_000


def test_device_pages_filter_sort_and_bound_in_sql(big):
    tok = big.tokens["read"]
    page = big.call("GET", "/api/v1/devices?limit=5&sort=cpu&order=desc", token=tok).json()
    cpus = [d["cpu_percent"] for d in page["items"]]
    assert page["total"] == N and len(cpus) == 5 and cpus == sorted(cpus, reverse=True)
    hit = big.call("GET", "/api/v1/devices?q=dev-0000_&limit=50", token=tok).json()
    assert hit["total"] == 0  # "_" is a character here, not a LIKE wildcard
    prof = big.call("GET", "/api/v1/devices?profile=rpi5&online=true", token=tok).json()
    assert prof["total"] == sum(1 for d in big.registry.devices()  # (the other test may
                                if d.profile == "rpi5" and d.online)  # take one offline)
    for bad in ("limit=0", "limit=5000", "sort=password", "online=maybe", "offset=-1"):
        assert big.call("GET", f"/api/v1/devices?{bad}", token=tok).status == 400, bad
    first = big.call("GET", "/api/v1/devices?limit=3", token=tok)
    again = big.call("GET", "/api/v1/devices?limit=3", token=tok,
                     headers={"If-None-Match": first.headers["etag"]})
    assert again.status == 304 and again.body == b""
    summary = big.call("GET", "/api/v1/summary", token=tok).json()
    assert summary["devices"] == N and summary["running"]["digits v2"] >= N // 4
    assert dataclasses.is_dataclass(WebSettings)
