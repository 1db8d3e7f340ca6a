"""The attack suite: each test replays one attack on a device serving digits v1 over a real
Mosquitto and asserts the device rejects it with a stable reason code on its status topic,
leaves nothing in its download cache, keeps the active model byte-identical and stays up."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from edgeship.agent.protocol import ReleaseAnnouncement, Topics
from edgeship.fleet.tuf_repo import refresh_timestamp
from tests.delivery.helpers import (RogueResponder, assert_untouched, edit_targets,
                                    honest_props, release_full, restart, set_hardware, variant_target,
                                    wait_event)


def _failed(env, version: int) -> str:
    return wait_event(env, "dev", "failed", version)["reason"]


# --- arbitrary bundle ---------------------------------------------------------------------

def test_arbitrary_bundle_with_bad_signature_is_rejected(loop_env, digits_bundles,
                                                         serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)

    def swap_model(targets):  # point v2's model at attacker bytes, keep the old signature
        for path, info in targets.targets.items():
            if path.endswith("/2/model.fp32.onnx"):
                info.hashes["sha256"] = "0" * 64
    edit_targets(loop_env.repo, loop_env.keys, swap_model, sign=False)
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) == "bad_signature"
    assert_untouched(agent, 1, before, x)


def test_arbitrary_bundle_signed_with_a_wrong_key_is_rejected(loop_env, digits_bundles,
                                                              serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    stranger = CryptoSigner.generate_ed25519()
    edit_targets(loop_env.repo, loop_env.keys, lambda t: None, targets_signer=stranger)
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) == "bad_signature"
    assert_untouched(agent, 1, before, x)


def test_arbitrary_root_signed_below_threshold_is_rejected(loop_env, digits_bundles,
                                                           serving_v1):
    """A new root that demands 2 of its keys but carries only 1 of them."""
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    meta = loop_env.repo / "metadata"
    root_md = Metadata.from_bytes((meta / "root.json").read_bytes())
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import SSlibKey
    priv = load_pem_private_key((loop_env.keys / "root-1.pem").read_bytes(), None)
    old = CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))
    new = [CryptoSigner.generate_ed25519() for _ in range(2)]
    root: Root = root_md.signed
    for keyid in list(root.roles[Root.type].keyids):
        root.revoke_key(keyid, Root.type)
    for s in new:
        root.add_key(s.public_key, Root.type)
    root.roles[Root.type].threshold = 2
    root.version += 1
    root_md.signatures.clear()
    root_md.sign(old, append=True)
    root_md.sign(new[0], append=True)  # one of two
    (meta / "2.root.json").write_bytes(root_md.to_bytes())
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) == "bad_signature"
    assert_untouched(agent, 1, before, x)


# --- rollback -----------------------------------------------------------------------------

def test_rollback_of_metadata_to_an_older_timestamp_is_rejected(loop_env, digits_bundles,
                                                                tmp_path):
    from tests.delivery.helpers import start_agent
    old_ts = (loop_env.repo / "metadata" / "timestamp.json").read_bytes()  # before v1
    agent = start_agent(loop_env, "dev")
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1)
    before, x = agent.store.active("digits").model_path.read_bytes(), \
        digits_bundles["trained"].data.x_test[:2]
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    (loop_env.repo / "metadata" / "timestamp.json").write_bytes(old_ts)  # validly signed
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) == "rollback"
    assert_untouched(agent, 1, before, x)


def test_rollback_of_model_version_is_rejected(loop_env, serving_v2):
    agent, before, x = serving_v2
    loop_env.announce("digits", 1)  # a replayed, validly signed older release
    ev = wait_event(loop_env, "dev", "rejected", 1)
    assert ev["reason"] == "stale_announcement"
    assert agent.updates.install("digits", 1) is False  # even when asked directly
    assert _failed(loop_env, 1) == "rollback"
    assert_untouched(agent, 2, before, x)


def test_rollback_of_model_version_after_agent_restart_is_rejected(loop_env, serving_v2):
    agent, before, x = serving_v2
    agent = restart(loop_env, agent)
    loop_env.announce("digits", 1)
    assert wait_event(loop_env, "dev", "rejected", 1)["reason"] == "stale_announcement"
    assert agent.updates.install("digits", 1) is False
    assert _failed(loop_env, 1) == "rollback"
    assert_untouched(agent, 2, before, x)
    # the floor is persisted on its own: it survives another restart
    agent = restart(loop_env, agent)
    assert agent.updates.downloader.version_floor.get("digits") == 2


# --- freeze -------------------------------------------------------------------------------

def test_freeze_with_an_expired_timestamp_is_reported_stale(loop_env, digits_bundles,
                                                            serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    # a mirror keeps serving a properly signed timestamp that has since expired
    refresh_timestamp(loop_env.repo, loop_env.keys,
                      now=datetime(2024, 1, 1, tzinfo=timezone.utc))
    loop_env.announce("digits", 2)
    stale = wait_event(loop_env, "dev", "metadata_stale", 2)
    assert stale["reason"] == "metadata_expired"
    assert _failed(loop_env, 2) == "metadata_expired"
    assert_untouched(agent, 1, before, x)


# --- endless data -------------------------------------------------------------------------

def test_endless_data_stops_at_the_pinned_length(loop_env, digits_bundles, serving_v1):
    agent, before, x = serving_v1
    release_full(loop_env, digits_bundles[2].bundle_dir)
    target = variant_target(loop_env.repo, 2)
    pinned = target.stat().st_size
    with open(target, "ab") as f:
        f.write(os.urandom(4 * 1024 * 1024))  # the server would send 4 MiB more
    received = agent.transfers.bytes_received
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) == "length_mismatch"
    fetched = agent.transfers.bytes_received - received
    chunk = agent.cfg.chunk_bytes
    assert fetched <= pinned + chunk + 64 * 1024, fetched  # + manifest and metadata
    assert_untouched(agent, 1, before, x)


# --- mix-and-match ------------------------------------------------------------------------

def test_mix_and_match_of_snapshot_versions_is_rejected(loop_env, digits_bundles,
                                                        serving_v1):
    agent, before, x = serving_v1
    meta = loop_env.repo / "metadata"
    old_snapshot = max(meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    new_snapshot = max(meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
    # serve the old (validly signed) snapshot under the new one's name
    shutil.copyfile(old_snapshot, new_snapshot)
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) in ("length_mismatch", "hash_mismatch")
    assert_untouched(agent, 1, before, x)


# --- wrong hardware class -----------------------------------------------------------------

def test_target_for_another_hardware_class_is_rejected(loop_env, digits_bundles, serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    edit_targets(loop_env.repo, loop_env.keys,
                 lambda t: set_hardware(t, "digits", 2, ["jetson-orin-nano"]))
    loop_env.announce("digits", 2)
    assert _failed(loop_env, 2) == "hardware_mismatch"
    assert_untouched(agent, 1, before, x)


# --- transport-level attacks --------------------------------------------------------------

def test_chunk_from_another_transfer_is_rejected(loop_env, digits_bundles, serving_v1):
    """A responder answers the model request with bytes of another file, correctly framed
    and with the right correlation data: TUF's pinned hash catches it."""
    agent, before, x = serving_v1
    release_full(loop_env, digits_bundles[2].bundle_dir)
    loop_env.fleet.stop()
    other = variant_target(loop_env.repo, 2, "model.int8.onnx").read_bytes()

    def mutate(request, honest):
        if request.path.endswith("model.fp32.onnx") and honest.status == 200:
            data = other[honest.offset:honest.offset + len(honest.data)]
            data = data.ljust(len(honest.data), b"\0")
            return data, honest_props(honest)
        return honest.data, honest_props(honest)
    rogue = RogueResponder(loop_env.url, loop_env.repo, mutate)
    try:
        # and stray chunks of other transfers (unknown correlation data) are dropped
        for i in range(3):
            loop_env.watcher.session.publish(Topics.transfer_response("dev"), b"x" * 100,
                                             correlation_data=os.urandom(16),
                                             user_properties={"status": "200"})
        loop_env.announce("digits", 2)
        assert _failed(loop_env, 2) == "hash_mismatch"
    finally:
        rogue.stop()
    assert agent.transfers.unmatched_responses >= 3
    assert_untouched(agent, 1, before, x)


def test_oversized_transfer_payload_is_rejected_before_parsing(loop_env, digits_bundles,
                                                               serving_v1):
    agent, before, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir, announce=False)
    loop_env.fleet.stop()

    def mutate(request, honest):
        if request.path.startswith("targets/"):
            return b"\0" * (request.length + 1), {"status": "not even a number"}
        return honest.data, honest_props(honest)
    rogue = RogueResponder(loop_env.url, loop_env.repo, mutate)
    try:
        loop_env.announce("digits", 2)
        assert _failed(loop_env, 2) == "payload_too_large"
    finally:
        rogue.stop()
    assert agent.transfers.oversized_responses >= 1
    assert_untouched(agent, 1, before, x)


def test_oversized_announcement_is_rejected_before_parsing(loop_env, serving_v1):
    agent, before, x = serving_v1
    loop_env.publish(Topics.release("digits"), b"{" + b" " * 70_000 + b"}")
    assert wait_event(loop_env, "dev", "rejected")["reason"] == "payload_too_large"
    assert_untouched(agent, 1, before, x)


def test_malformed_json_announcement_is_rejected(loop_env, serving_v1):
    agent, before, x = serving_v1
    loop_env.publish(Topics.release("digits"), b'{"schema": 1, "kind": "release", "model"')
    assert wait_event(loop_env, "dev", "rejected")["reason"] == "malformed_message"
    # and a malformed transfer request does not hurt the fleet server either
    loop_env.watcher.session.publish(Topics.transfer_request("dev"), b"{not json",
                                     response_topic=Topics.transfer_response("dev"),
                                     correlation_data=b"c")
    assert_untouched(agent, 1, before, x)
    assert loop_env.fleet.wait_connected(5)


def test_replayed_announcement_is_rejected(loop_env, serving_v2):
    agent, before, x = serving_v2
    old = ReleaseAnnouncement("digits", 1, 0.0).to_bytes()  # recorded earlier, replayed
    loop_env.publish(Topics.release("digits"), old, retain=True)
    ev = wait_event(loop_env, "dev", "rejected", 1)
    assert ev["reason"] == "stale_announcement"
    assert_untouched(agent, 2, before, x)
    assert json.loads(old)["version"] == 1
