"""Hostile numbers and nesting in messages and manifests: a 5,000-digit integer (past
Python's int-conversion limit), a value past 2^63-1 (SQLite's INTEGER, every signed
64-bit store) and 30,000 levels of JSON nesting are all rejected with a reason code —
never a traceback, never a crash of the thread that parsed them."""

from __future__ import annotations

import json

import pytest

from edgeship.agent import protocol
from edgeship.agent.errors import BundleError, ProtocolError, Reason
from edgeship.agent.manifest import Manifest
from edgeship.agent.protocol import (DesiredState, ReleaseAnnouncement, Topics, TransferRequest,
                                     encode)
from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.tuf_repo import init_repository
from tests.support import models, wait_until
from tests.support.attacks import RawDevice
from tests.support.loop_env import Fleet

HUGE = "9" * 5000
DEEP = "[" * 30_000 + "]" * 30_000


def _msg(kind: str, **fields: str) -> bytes:
    body = ", ".join(f'"{k}": {v}' for k, v in fields.items())
    return f'{{"schema": 1, "kind": "{kind}", {body}}}'.encode()


@pytest.mark.parametrize("payload", [
    _msg("release", model='"m"', version=HUGE, released_at="0"),
    _msg("release", model='"m"', version=str(2**63), released_at="0"),
    _msg("release", model='"m"', version="1", released_at=HUGE),
    _msg("release", model='"m"', version="1", released_at="1e400"),
    _msg("release", model='"m"', version="1", released_at="0", spread_s=DEEP),
    _msg("desired", model='"m"', version="1", seq=HUGE),
    _msg("desired", model='"m"', version="1", seq=str(2**64)),
    _msg("desired", model='"m"', version=str(2**63), seq="1"),
    _msg("transfer_request", path='"targets/m/1/f"', offset=HUGE, length="10"),
    _msg("transfer_request", path='"targets/m/1/f"', offset=str(2**63), length="10"),
    DEEP.encode(),
    ('{"a":' * 10_000 + "1" + "}" * 10_000).encode(),
])
def test_hostile_numbers_and_nesting_are_malformed_messages(payload):
    for parse in (ReleaseAnnouncement.from_bytes, DesiredState.from_bytes,
                  TransferRequest.from_bytes, protocol.decode):
        with pytest.raises(ProtocolError) as err:
            parse(payload)
        assert err.value.reason_code in (Reason.MALFORMED_MESSAGE,)


def test_largest_allowed_numbers_still_parse():
    big = 2**63 - 1
    d = DesiredState.from_bytes(_msg("desired", model='"m"', version=str(big), seq=str(big)))
    assert (d.version, d.seq) == (big, big)


def _manifest(**override) -> dict:
    sha = "0" * 64
    raw = {"schema": 1, "model": "digits", "version": 1, "task": "classification",
           "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}],
           "variants": [{"id": "onnx-fp32", "runtime": "onnxruntime", "precision": "fp32",
                         "file": "model.onnx", "sha256": sha, "size": 10}],
           "golden": {"file": "golden.npz", "sha256": sha, "size": 10}}
    raw.update(override)
    return raw


@pytest.mark.parametrize("text", [
    json.dumps(_manifest()).replace('"version": 1', f'"version": {HUGE}'),
    json.dumps(_manifest()).replace('"size": 10', f'"size": {HUGE}', 1),
    json.dumps(_manifest(labels=[])).replace('"labels": []', f'"labels": {DEEP}'),
])
def test_hostile_numbers_and_nesting_in_a_manifest_are_bundle_errors(text):
    with pytest.raises(BundleError):
        Manifest.from_bytes(text.encode())


# --- the fleet server: hostile device reports are counted, never a traceback ----------------

def test_hostile_device_reports_are_counted_as_malformed_without_a_traceback(
        broker, tmp_path, caplog):

    init_repository(tmp_path / "keys", tmp_path / "repo")
    server = FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=tmp_path / "repo",
                                       db_path=tmp_path / "fleet.db"))
    server.start()
    dev = RawDevice(broker.url, "dev")
    try:
        hostile = [
            (Topics.status("dev"), _msg("status", device='"dev"', event='"serving"',
                                        version=HUGE)),
            (Topics.status("dev"), _msg("status", device='"dev"', event='"serving"',
                                        model='"m"', version=str(2**64))),
            (Topics.telemetry("dev"), _msg("telemetry", requests=str(2**63))),
            (Topics.presence("dev"), DEEP.encode()),
            (Topics.telemetry("dev"), _msg("telemetry", latency="NaN")),
        ]
        for topic, payload in hostile:
            dev.publish(topic, payload)
        dev.publish(Topics.status("dev"), encode("status", {
            "device": "dev", "event": "serving", "model": "m", "version": 2**63 - 1}))
        wait_until(lambda: server.stats.snapshot()["records"] >= 1, 10, "the good report")
        assert server.stats.snapshot()["malformed"] == len(hostile)
        assert [e.version for e in server.registry.events("dev")] == [2**63 - 1]
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    finally:
        dev.close()
        server.stop()


# --- the agent: hostile MQTT messages become `rejected` events, updates carry on -----------

def test_agent_answers_hostile_messages_with_rejected_and_keeps_updating(loop_env, tmp_path):

    fleet = Fleet(loop_env, tmp_path)
    loop_env.start_agent("dev")
    fleet.release("m", 1, models.good(1))
    loop_env.wait_serving("dev", 1)
    hostile = [(Topics.release("m"), _msg("release", model='"m"', version=HUGE,
                                          released_at="0")),
               (Topics.desired("dev"), _msg("desired", model='"m"', version="2", seq=HUGE)),
               (Topics.desired("dev"), _msg("desired", model='"m"', version="2",
                                            seq=str(2**64))),
               (Topics.release("m"), DEEP.encode())]
    for topic, payload in hostile:
        loop_env.publish(topic, payload)
    rejected = lambda: [e for e in loop_env.watcher.events  # noqa: E731
                        if e.get("device") == "dev" and e.get("event") == "rejected"]
    wait_until(lambda: len(rejected()) >= len(hostile), 20, "a rejected event per message")
    assert {e["reason"] for e in rejected()} == {"malformed_message"}
    fleet.release("m", 2, models.good(2))
    loop_env.wait_serving("dev", 2)
