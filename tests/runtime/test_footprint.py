"""The agent's idle footprint: python-tuf's client (with securesystemslib's signers and
cryptography, ~11 MB of RSS) is loaded when an update runs, not when the agent starts; the
agent's fetchers keep the download contract tuf's ``Updater`` relies on; zstandard and
prometheus_client wait for the first delta and the first scrape; the Open Inference
Protocol routes, the language-model front end, release archives, golden checks and the
quality statistics wait for their first request (``scripts/bench-agent --rss-only``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface as TufFetcherInterface

from edgeship.agent.update.fetcher_base import FetcherInterface

# loaded when first needed: an update, a delta, a scrape, a v2 or LLM request, an archive
ON_DEMAND = ("tuf.ngclient", "tuf.api.metadata", "securesystemslib.signer", "cryptography",
             "zstandard", "prometheus_client", "edgeship.agent.api_v2", "edgeship.agent.oip",
             "edgeship.agent.llm.http", "edgeship.agent.llm.runtime", "edgeship.agent.archive",
             "tarfile", "edgeship.agent.golden", "statistics")
if sys.version_info >= (3, 10):  # 3.9's platform module (paho and the agent import it) loads it itself
    ON_DEMAND += ("subprocess",)


def test_importing_the_agent_daemon_loads_neither_the_tuf_client_nor_prometheus():
    code = ("import sys, edgeship.agent.daemon, edgeship.agent.update.transfer,"
            " edgeship.agent.update.http_fetch\n"
            f"print(sorted(m for m in {ON_DEMAND!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", f"imported at start-up: {out.strip()}"


IDLE_AGENT = """
import json, sys, urllib.request
from edgeship.agent.config import config_from_dict
from edgeship.agent.daemon import Agent
agent = Agent(config_from_dict({"device_id": "pi-1", "state_dir": sys.argv[1], "api_port": 0,
                                "llm_max_active": 3}))
agent.local_api.start()
lazy = ("edgeship.agent.api_v2", "edgeship.agent.llm.http")
idle = sorted(m for m in lazy if m in sys.modules)
with urllib.request.urlopen(agent.api.url + "/v2/health/live") as r:
    v2 = json.load(r)
from edgeship.agent.llm.http import frontend
print(json.dumps([idle, v2, frontend(agent.server).admission.max_active]))
agent.local_api.stop()
"""


def test_an_idle_agent_loads_v2_and_the_llm_front_end_on_first_use(tmp_path):
    out = subprocess.run([sys.executable, "-c", IDLE_AGENT, str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    idle, v2, max_active = json.loads(out.strip().splitlines()[-1])
    assert idle == [] and v2 == {"live": True}
    assert max_active == 3  # the config's admission bound, applied on first lookup


def _fetcher(base: type, chunks: list[bytes] | Exception) -> object:
    class Fetcher(base):
        def _fetch(self, url):
            if isinstance(chunks, Exception):
                raise chunks
            return iter(chunks)
    return Fetcher()


@pytest.mark.parametrize("base", [FetcherInterface, TufFetcherInterface],
                         ids=["agent", "tuf"])
def test_fetcher_base_keeps_tufs_download_contract(base):
    assert _fetcher(base, [b"ab", b"cd"]).download_bytes("u", 4) == b"abcd"
    with _fetcher(base, [b"ab", b"cd"]).download_file("u", 4) as f:
        assert f.read() == b"abcd"
    with pytest.raises(tuf_exc.DownloadLengthMismatchError):
        _fetcher(base, [b"ab", b"cde"]).download_bytes("u", 4)
    with pytest.raises(tuf_exc.DownloadError) as err:
        _fetcher(base, ValueError("boom")).download_bytes("u", 4)
    assert isinstance(err.value.__cause__, ValueError)
    http = tuf_exc.DownloadHTTPError("404 for u", 404)
    with pytest.raises(tuf_exc.DownloadHTTPError):
        _fetcher(base, http).download_bytes("u", 4)
    with pytest.raises(TypeError):
        base()  # _fetch is abstract


def test_prometheus_metrics_render_the_served_models_numbers(tmp_path):
    import numpy as np

    from edgeship.agent.metrics import AgentCollector, Metrics
    from tests.runtime.models import IN_DIM, serve, weights, write_dense_onnx

    pytest.importorskip("onnx")
    server = serve(write_dense_onnx(tmp_path / "d.onnx", *weights(1)), "onnxruntime")
    for batch in (1, 4, 2):
        server.predict("dense", np.ones((batch, IN_DIM), np.float32))
    with pytest.raises(Exception):
        server.predict("dense", np.ones((1, IN_DIM + 1), np.float32))
    metrics = Metrics(AgentCollector(server, None, lambda: {"rss_mb": 12.5},
                                     {"agent_version": "t"}))
    text = metrics.text().decode()
    labels = '{model="dense",variant="onnxruntime-fp32",version="1"}'
    assert f"edgeship_model_requests_total{labels} 4.0" in text
    assert f"edgeship_model_errors_total{labels} 1.0" in text
    assert f"edgeship_model_samples_total{labels} 8.0" in text
    count = '{le="+Inf",model="dense",variant="onnxruntime-fp32",version="1"} 3.0'
    assert f"edgeship_model_latency_seconds_bucket{count}" in text
    assert "edgeship_device_rss_mb 12.5" in text
    assert metrics.text().decode().count("edgeship_model_requests_total{") == 1


def test_the_lazy_routes_are_the_route_modules_own():
    """Each route whose module loads on first use matches that module's table: same
    method, path, error body and raw flag, and none missing or extra."""
    from edgeship.agent import api_v2
    from edgeship.agent.api import lazy_routes
    from edgeship.agent.llm import http as llm_http

    def table(routes):
        return {(r.method, r.pattern, r.errors, r.raw) for r in routes}

    assert table(lazy_routes()) == table(api_v2.ROUTES + llm_http.ROUTES)
