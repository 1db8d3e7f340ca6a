"""HTTP transport: the same repository directory served by a real nginx; a real TUF
Updater downloads through HttpFetcher, and an interrupted download resumes with Range."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import urllib3
from tuf.ngclient import Updater

from edgeship.agent.daemon import Agent
from edgeship.agent.update.http_fetch import HttpFetcher
from edgeship.fleet.tuf_repo import init_repository, release_bundle
from tests.delivery.helpers import release_full, resume_files, start_agent, variant_target
from tests.support import wait_until


def _updater(base: str, device: Path, repo: Path, fetcher: HttpFetcher) -> Updater:
    device.mkdir(exist_ok=True)
    if not (device / "root.json").exists():
        shutil.copyfile(repo / "metadata" / "1.root.json", device / "root.json")
    return Updater(metadata_dir=str(device), metadata_base_url=f"{base}/metadata/",
                   target_base_url=f"{base}/targets/", fetcher=fetcher, bootstrap=None)


def test_interrupted_http_download_resumes_with_range(nginx, tmp_path, digits_bundles):
    base, repo, access_log = nginx
    init_repository(tmp_path / "keys", repo)
    release_bundle(digits_bundles[1].bundle_dir, repo, tmp_path / "keys")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    fetcher = HttpFetcher(downloads)
    updater = _updater(base, tmp_path / "dev", repo, fetcher)
    updater.refresh()
    info = updater.get_targetinfo("digits/1/model.fp32.onnx")
    url = f"{base}/targets/digits/1/{info.hashes['sha256']}.model.fp32.onnx"
    # first attempt: the connection drops after the first block
    gen = fetcher.fetch(url)
    next(gen)
    with pytest.raises(Exception):
        gen.throw(urllib3.exceptions.ProtocolError("connection reset"))
    (part,) = downloads.glob("*.resume")
    kept = part.stat().st_size
    assert 0 < kept < info.length
    # second attempt through TUF: Range from where it stopped, verified as a whole
    out = updater.download_target(info, filepath=str(tmp_path / "model.onnx"))
    assert Path(out).read_bytes() == (digits_bundles[1].bundle_dir /
                                      "model.fp32.onnx").read_bytes()
    assert fetcher.bytes_resumed == kept
    last = access_log.read_text().strip().splitlines()[-1]
    assert '" 206 ' in last  # nginx answered a partial response
    assert list(downloads.iterdir()) == []


def test_http_updater_rejects_a_tampered_target(nginx, tmp_path, digits_bundles):
    base, repo, _ = nginx
    init_repository(tmp_path / "keys", repo)
    release_bundle(digits_bundles[1].bundle_dir, repo, tmp_path / "keys")
    (target,) = (repo / "targets" / "digits" / "1").glob("*.model.fp32.onnx")
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.write_bytes(bytes(data))
    updater = _updater(base, tmp_path / "dev", repo, HttpFetcher(tmp_path))
    updater.refresh()
    from tuf.api.exceptions import LengthOrHashMismatchError
    with pytest.raises(LengthOrHashMismatchError):
        updater.download_target(updater.get_targetinfo("digits/1/model.fp32.onnx"),
                                filepath=str(tmp_path / "m.onnx"))


def test_agent_configured_for_http_installs_and_resumes_after_a_restart(
        nginx, loop_env, digits_bundles):
    """``transport = "http"``: a real agent fetches metadata and targets from nginx (the
    fleet server answers no transfer request), is stopped mid-download and, restarted,
    resumes with a Range request (nginx answers 206)."""
    base, repo, access_log = nginx
    assert repo == loop_env.repo  # nginx serves the fleet's repository directory
    agent = start_agent(loop_env, "dev-http", transport="http", http_base_url=base,
                        transfer_max_bytes_per_s=48_000)
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev-http", 1, timeout_s=90)
    release_full(loop_env, digits_bundles[2].bundle_dir, announce=True)
    target = variant_target(loop_env.repo, 2)
    size = target.stat().st_size
    wait_until(lambda: any(p.stat().st_size >= size // 3 for p in resume_files(agent)),
               60, what="a third of v2 downloaded over HTTP")
    agent.stop()  # mid-transfer
    loop_env.agents.remove(agent)
    (part,) = resume_files(agent)
    kept = part.stat().st_size
    assert 0 < kept < size
    again = Agent(dataclasses.replace(agent.cfg, transfer_max_bytes_per_s=0))
    again.start()
    loop_env.agents.append(again)
    loop_env.wait_serving("dev-http", 2, timeout_s=90)
    assert again.updates.fetcher.bytes_resumed == kept  # replayed from disk
    assert again.store.active("digits").model_path.read_bytes() == target.read_bytes()
    ranged = [line for line in access_log.read_text().splitlines()
              if target.name in line and '" 206 ' in line]
    assert ranged, "no Range request for the interrupted target"
    assert loop_env.fleet.stats.snapshot()["requests_served"] == 0  # nothing over MQTT
    assert resume_files(again) == []


@pytest.mark.parametrize("raw, key", [
    ({"transport": "ftp"}, "transport"),
    ({"transport": "http"}, "http_base_url"),
    ({"transport": "http", "http_base_url": "ftp://cdn/repo"}, "http_base_url"),
    ({"transport": "http", "http_base_url": "https://cdn/repo?x=1"}, "http_base_url"),
])
def test_transport_config_errors_name_the_key(raw, key):
    from edgeship.agent.config import config_from_dict
    from edgeship.agent.errors import ConfigError
    with pytest.raises(ConfigError, match=key) as err:
        config_from_dict({"device_id": "d", "state_dir": "/tmp/d", **raw})
    assert err.value.key == key
    ok = config_from_dict({"device_id": "d", "state_dir": "/tmp/d", "transport": "http",
                           "http_base_url": "https://cdn.example.net/repo"})
    assert ok.transport == "http"
