"""The foundation loop against a real Mosquitto: release → MQTT download → TUF verify →
install → serve; and every kind of bad input rejected with a reason code while the agent
keeps serving its current model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tuf.api.metadata import Metadata

from edgeship.agent.protocol import Topics
from tests.support.loop_env import predict


def _active_bytes(agent, model="digits") -> bytes:
    inst = agent.store.active(model)
    return inst.model_path.read_bytes()


def _target_files(repo: Path, version: int) -> list[Path]:
    return sorted((repo / "targets" / "digits" / str(version)).iterdir())


def _variant_target(repo: Path, version: int, variant_file: str) -> Path:
    (match,) = [p for p in _target_files(repo, version) if p.name.endswith("." + variant_file)]
    return match


def _assert_untouched(agent, version: int, before: bytes, x) -> None:
    assert agent.store.active("digits").version == version
    assert _active_bytes(agent) == before
    assert predict(agent, "digits", x)["version"] == version  # still serving, still up
    assert not list(agent.cfg.downloads_dir.iterdir()), "download cache not emptied"
    leftovers = [p.name for p in (agent.cfg.models_dir / "digits").iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []


def test_release_is_downloaded_over_mqtt_verified_installed_and_served(loop_env,
                                                                      digits_bundles):
    agent = loop_env.start_agent("pi-a", profile="rpi4")
    loop_env.release(digits_bundles[1].bundle_dir)
    ev = loop_env.wait_serving("pi-a", 1)
    assert ev["variant"] == "onnx-int8"  # rpi4 prefers int8
    chain = loop_env.watcher.chain("pi-a", 1)
    assert chain[:6] == ["downloading", "verifying", "staged", "health_check", "trial",
                         "serving"]  # issue 4: serving during the trial, then committed
    x = digits_bundles["trained"].data.x_test
    out = predict(agent, "digits", x[:5])
    assert out["version"] == 1 and np.asarray(out["outputs"]["logits"]).shape == (5, 10)
    # then an update to v2 is hot-swapped in
    loop_env.release(digits_bundles[2].bundle_dir)
    loop_env.wait_serving("pi-a", 2)
    assert predict(agent, "digits", x[:1])["version"] == 2


@pytest.fixture
def serving_v1(loop_env, digits_bundles):
    agent = loop_env.start_agent("pi-b")
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("pi-b", 1)
    return agent, _active_bytes(agent), digits_bundles["trained"].data.x_test[:2]


def test_truncated_model_file_is_rejected_and_old_model_keeps_serving(loop_env,
                                                                      digits_bundles,
                                                                      serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    target = _variant_target(loop_env.repo, 2, "model.fp32.onnx")
    target.write_bytes(target.read_bytes()[:1000])
    loop_env.announce("digits", 2)
    ev = loop_env.wait_failed("pi-b", 2)
    assert ev["reason"] == "length_mismatch"
    _assert_untouched(agent, 1, before, x)


def test_model_file_with_wrong_hash_is_rejected(loop_env, digits_bundles, serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    target = _variant_target(loop_env.repo, 2, "model.fp32.onnx")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    loop_env.announce("digits", 2)
    assert loop_env.wait_failed("pi-b", 2)["reason"] == "hash_mismatch"
    _assert_untouched(agent, 1, before, x)


def test_metadata_with_a_wrong_signature_is_rejected(loop_env, digits_bundles, serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    ts_path = loop_env.repo / "metadata" / "timestamp.json"
    md = Metadata.from_bytes(ts_path.read_bytes())
    md.signed.version += 1  # changed after signing: the signature no longer matches
    ts_path.write_bytes(md.to_bytes())
    loop_env.announce("digits", 2)
    assert loop_env.wait_failed("pi-b", 2)["reason"] == "bad_signature"
    _assert_untouched(agent, 1, before, x)


def test_release_missing_from_signed_metadata_is_rejected(loop_env, serving_v1):
    agent, before, x = serving_v1
    loop_env.announce("digits", 7)  # announced, never signed
    assert loop_env.wait_failed("pi-b", 7)["reason"] == "not_found"
    _assert_untouched(agent, 1, before, x)


@pytest.mark.parametrize("payload,reason", [
    (b"\x00garbage{", "malformed_message"),
    (json.dumps({"schema": 42, "kind": "release", "model": "digits", "version": 9,
                 "released_at": 0}).encode(), "unsupported_schema"),
    (json.dumps({"schema": 1, "kind": "release", "model": "digits",
                 "version": "nine", "released_at": 0}).encode(), "malformed_message"),
    (b"{" + b" " * 70_000 + b"}", "payload_too_large"),
])
def test_malformed_or_unknown_schema_messages_are_rejected(loop_env, serving_v1, payload,
                                                           reason):
    agent, before, x = serving_v1
    loop_env.publish(Topics.release("digits"), payload)
    ev = loop_env.watcher.wait_for(lambda e: e.get("device") == "pi-b" and
                                   e.get("event") == "rejected")
    assert ev["reason"] == reason
    _assert_untouched(agent, 1, before, x)


def test_agent_restarted_offline_serves_its_committed_model(loop_env, serving_v1, broker):
    agent, before, x = serving_v1
    cfg = agent.cfg
    agent.stop()
    loop_env.agents.remove(agent)
    broker.stop()  # no network at all
    from edgeship.agent.daemon import Agent
    offline = Agent(cfg)
    offline.start()
    try:
        assert predict(offline, "digits", x)["version"] == 1
    finally:
        offline.stop()
