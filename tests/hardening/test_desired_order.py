"""The desired-state order cannot be captured from outside: desired states are ordered by
(registry epoch, seq) and signed by the fleet with the repository's online timestamp key.
A recreated registry starts a newer epoch and so regains control of every device."""

from __future__ import annotations

import queue

import pytest
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Signature
from tuf.api.metadata import Metadata

from edgeship.agent.mqtt import MqttSession, SessionSettings
from edgeship.agent.protocol import DesiredState, Topics
from edgeship.fleet.registry import Registry
from edgeship.fleet.server import FleetServer, FleetSettings


def test_a_recreated_registry_has_a_newer_epoch(tmp_path):
    first = Registry(tmp_path / "a.db", clock=lambda: 1_700_000_000.0)
    assert first.epoch == 1_700_000_000_000
    first.close()
    again = Registry(tmp_path / "a.db", clock=lambda: 1_800_000_000.0)
    assert again.epoch == 1_700_000_000_000  # fixed when the registry was created
    again.close()
    (tmp_path / "a.db").unlink()
    recreated = Registry(tmp_path / "a.db", clock=lambda: 1_700_000_100.0)
    assert recreated.epoch > first.epoch
    recreated.close()


def test_desired_order_is_epoch_then_seq():
    assert DesiredState("m", 1, 1, epoch=2).order > DesiredState("m", 1, 10**12, epoch=1).order
    assert DesiredState("m", 1, 5).order > DesiredState("m", 1, 4).order
    old_agent_view = DesiredState("m", 1, 5, epoch=3, sig=("ab", "cd"))
    assert DesiredState.from_bytes(old_agent_view.to_bytes()) == old_agent_view


def test_the_fleet_signs_desired_states_with_the_online_timestamp_key(broker, repo, tmp_path):
    keys, repo_dir = repo
    inbox: queue.Queue = queue.Queue()
    watcher = MqttSession(SessionSettings(url=broker.url, client_id="watch-desired",
                                          clean_start=True, session_expiry_s=0), inbox.put)
    watcher.start([(Topics.desired("dev"), 1)])
    assert watcher.wait_subscribed(10)
    server = FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=repo_dir,
                                       db_path=tmp_path / "fleet.db", keys_dir=keys))
    server.start()
    try:
        server.publish_desired("dev", DesiredState("m", 3, 7, "r-1"))
        sent = DesiredState.from_bytes(inbox.get(timeout=10).payload)
    finally:
        server.stop()
        watcher.stop()
    assert (sent.model, sent.version, sent.seq, sent.epoch) == ("m", 3, 7,
                                                                 server.registry.epoch)
    root = Metadata.from_file(str(repo_dir / "metadata" / "root.json")).signed
    keyid, sig = sent.sig
    assert keyid in root.roles["timestamp"].keyids
    key = root.keys[keyid]
    key.verify_signature(Signature(keyid, sig), sent.signing_bytes("dev"))
    with pytest.raises(UnverifiedSignatureError):  # not valid for another device
        key.verify_signature(Signature(keyid, sig), sent.signing_bytes("other"))
