"""HTTP transport: the same repository directory served by a real nginx; a real TUF
Updater downloads through HttpFetcher, and an interrupted download resumes with Range."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import urllib3
from tuf.ngclient import Updater

from agent.http_fetch import HttpFetcher
from fleet.broker import free_port
from fleet.tuf_repo import init_repository, release_bundle


@pytest.fixture
def nginx(tmp_path):
    """nginx on a free loopback port, serving ``tmp_path/repo``; config, logs, pid in tmp."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx not installed")
    repo, run = tmp_path / "repo", tmp_path / "nginx"
    run.mkdir()
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read tmp_path
    temps = "".join(f"{k}_temp_path {run}/{k};\n" for k in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (run / "nginx.conf").write_text(
        f"{user}daemon off;\npid {run}/nginx.pid;\nerror_log {run}/error.log;\n"
        "worker_processes 1;\nevents {}\nhttp {\n"
        f"access_log {run}/access.log;\n{temps}"
        f"server {{ listen 127.0.0.1:{port}; root {repo};\n"
        "  location ~ /\\. { deny all; } }\n}\n")
    proc = subprocess.Popen([binary, "-p", str(run), "-c", str(run / "nginx.conf")],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", repo, run / "access.log"
    proc.terminate()
    proc.wait(10)


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
