"""The desired-state order cannot be captured from outside: desired states are ordered by
(registry epoch, seq) and signed by the fleet with the repository's online timestamp key.
A recreated registry starts a newer epoch and so regains control of every device."""

from __future__ import annotations

import queue
import time
from dataclasses import replace

import pytest
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Signature
from tuf.api.metadata import Metadata

from edgeship.common.mqtt import MqttSession, SessionSettings
from edgeship.agent.protocol import DesiredState, Topics
from edgeship.fleet.registry import Registry
from edgeship.fleet.server import FleetServer, FleetSettings
from tests.support import models, wait_until
from tests.support.loop_env import Fleet, predict


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


# --- the device side ------------------------------------------------------------------------

def _rejected(env, since: float) -> dict:
    return env.watcher.wait_for(lambda e: e.get("device") == "dev" and
                                e.get("event") == "rejected" and e.get("ts", 0) > since)


def test_nobody_but_the_fleet_can_capture_the_desired_order(loop_env, tmp_path):
    loop_env.fleet.stop()
    loop_env.fleet = FleetServer(FleetSettings(mqtt_url=loop_env.url, repo_dir=loop_env.repo,
                                               db_path=tmp_path / "a.db",
                                               keys_dir=loop_env.keys))
    loop_env.fleet.start()
    fleet = Fleet(loop_env, tmp_path)
    agent = loop_env.start_agent("dev")
    fleet.release("m", 1, models.good(1))
    loop_env.wait_serving("dev", 1)  # v1 kept on the device: the fleet's rollback reverts to it
    fleet.release("m", 2, models.good(2))
    loop_env.wait_serving("dev", 2)
    x = models.golden_inputs()[:1]

    def version() -> int:
        return predict(agent, "m", x)["version"]

    loop_env.fleet.publish_desired("dev", DesiredState("m", 1, 1))  # signed, epoch A
    wait_until(lambda: version() == 1, 30, "the fleet's rollback to v1")
    since = time.time()
    # an outsider's order with a seq far above the fleet's: unsigned, then a stranger's key
    loop_env.publish(Topics.desired("dev"), DesiredState("m", 2, 2**62).to_bytes(), retain=True)
    assert _rejected(loop_env, since)["reason"] == "bad_signature"
    forged = DesiredState("m", 2, 2**62, epoch=2**62)
    stranger = CryptoSigner.generate_ed25519()
    sig = stranger.sign(forged.signing_bytes("dev"))
    since = time.time()
    loop_env.publish(Topics.desired("dev"), replace(forged, sig=(sig.keyid, sig.signature))
                     .to_bytes(), retain=True)
    assert _rejected(loop_env, since)["reason"] == "bad_signature"
    assert version() == 1
    old_order = DesiredState("m", 2, 2)
    loop_env.fleet.publish_desired("dev", old_order)  # the fleet is still in control
    wait_until(lambda: version() == 2, 30, "the fleet's next command")

    # the registry is recreated: a newer epoch, seq starting again at 1
    loop_env.fleet.stop()
    time.sleep(0.01)
    loop_env.fleet = FleetServer(FleetSettings(mqtt_url=loop_env.url, repo_dir=loop_env.repo,
                                               db_path=tmp_path / "b.db",
                                               keys_dir=loop_env.keys))
    loop_env.fleet.start()
    loop_env.fleet.publish_desired("dev", DesiredState("m", 1, 1))
    wait_until(lambda: version() == 1, 30, "the recreated registry's command")
