"""Air-gapped updates, the device side: ``edgeship agent install FILE`` with no broker at all
— by itself (no agent running) and handed to a running agent over its Unix socket — goes
through the same TUF checks, lifecycle, health check and rollback as an update over the
network; a tampered or older archive is refused with the fleet's reason codes and the
device keeps what it serves, byte for byte."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.agent.store import ModelStore
from edgeship.cli import main
from edgeship.fleet.broker import free_port
from edgeship.fleet.export import export_release
from edgeship.fleet.tuf_repo import init_repository, release_bundle
from tests.support import wait_until
from tests.support.synthetic import sample_inputs, write_synthetic_bundle

WIDTH = 32


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fleet")
    init_repository(root / "keys", root / "repo")
    out = {"root": root}
    for version in (1, 2):
        bundle = write_synthetic_bundle(root / f"b{version}", version=version, width=WIDTH,
                                        seed=version)
        release_bundle(bundle, root / "repo", root / "keys")
        out[version] = export_release(root / "repo", root / "keys", "synth", version,
                                      root / f"synth-v{version}.tar").path
    out["tampered"] = _tampered(out[2], root / "synth-v2-tampered.tar")
    return out


def _tampered(src: Path, dest: Path) -> Path:
    """v2's archive with one byte of its model file flipped (signatures untouched)."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin:
            data = tin.extractfile(info).read()
            if info.name.startswith("targets/") and info.name.endswith(".onnx"):
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            tout.addfile(info, io.BytesIO(data))
    return dest


@pytest.fixture
def device(archives, tmp_path) -> Path:
    """A provisioned device (pinned root, config) whose broker does not exist."""
    state = tmp_path / "state"
    (state / "tuf").mkdir(parents=True)
    (state / "tuf/root.json").write_bytes(
        (archives["root"] / "repo/metadata/1.root.json").read_bytes())
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "airgap-1"\nstate_dir = "{state}"\n'
                   f'mqtt_url = "mqtt://127.0.0.1:{free_port()}"\n'
                   'profile = "generic-x86_64"\napi_enabled = false\ntrial_window_s = 0\n')
    return cfg


def install(archive: Path, cfg: Path, capsys) -> tuple[int, dict]:
    rc = main(["agent", "install", str(archive), "--config", str(cfg), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def active(cfg: Path):
    return ModelStore(load_config(cfg).models_dir).active("synth")


def test_archives_install_in_order_with_no_broker(archives, device, capsys):
    rc, doc = install(archives[1], device, capsys)
    assert rc == 0 and doc["installed"] and doc["variant"] == "onnx-fp32", doc
    events = [e["event"] for e in doc["events"]]
    assert events[0] == "downloading" and "health_check" in events, events
    assert "serving" in events and events[-1] == "committed", events
    rc, doc = install(archives[2], device, capsys)
    assert rc == 0 and active(device).version == 2
    # the same archive again: nothing to do, still fine
    rc, doc = install(archives[2], device, capsys)
    assert rc == 0 and doc["events"] == []


def test_a_tampered_archive_is_refused_and_the_device_keeps_its_model(archives, device,
                                                                      capsys):
    assert install(archives[1], device, capsys)[0] == 0
    before = active(device).model_path.read_bytes()
    rc = main(["agent", "install", str(archives["tampered"]), "--config", str(device)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("edgeship: error: synth v2 not installed (hash_mismatch")
    assert "the device keeps v1" in err[0]
    assert active(device).version == 1 and active(device).model_path.read_bytes() == before
    assert not list(load_config(device).downloads_dir.glob("*.part"))


def test_an_older_archive_is_refused_like_a_stale_announcement(archives, device, capsys):
    assert install(archives[2], device, capsys)[0] == 0
    rc, doc = install(archives[1], device, capsys)
    assert rc == 1 and doc["reason"] == "stale_announcement" and doc["active_version"] == 2


def test_not_an_archive_or_no_file_is_bad_input(device, tmp_path, capsys):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0" * 1024)
    assert main(["agent", "install", str(junk), "--config", str(device)]) == 2
    assert main(["agent", "install", str(tmp_path / "none.tar"), "--config", str(device)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("edgeship: error: ") for e in err)


def test_a_running_agent_takes_the_archive_over_its_socket(archives, device, capsys):
    agent = Agent(load_config(device))
    reported: list[str] = []  # what the agent itself went through (the command polls)
    agent.report_hooks.append(lambda event, fields: reported.append(str(event)))
    agent.start()
    try:
        rc, doc = install(archives[1], device, capsys)
        assert rc == 0 and doc["installed"], doc
        states = [e["event"] for e in doc["events"]]  # the update record, followed
        assert states[-1] == "idle", states
        assert "health_check" in reported and "serving" in reported, reported
        wait_until(lambda: agent.server.find("synth") is not None, timeout_s=30)
        assert agent.server.find("synth").installed.version == 1  # serving it, live
        x = sample_inputs(WIDTH, rows=2)
        outputs, _ = agent.server.predict("synth", x)
        assert np.asarray(outputs[0]).shape == (2, 10)
        rc, doc = install(archives[1], device, capsys)  # again: already active
        assert rc == 0
        # the running agent refuses an older version at once, with the fleet's reason
        assert install(archives[2], device, capsys)[0] == 0
        rc, doc = install(archives[1], device, capsys)
        assert rc == 1 and doc["reason"] == "stale_announcement"
        assert not list((load_config(device).state_dir / "inbox").iterdir())
    finally:
        agent.stop()
