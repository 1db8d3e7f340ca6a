"""Helpers for the delivery tests: re-signing metadata like an attacker (or a careless
operator) would, a rogue transfer responder, and the 'nothing changed' assertion."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Snapshot, Targets, Timestamp

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.common.mqtt import Message, MqttSession, SessionSettings
from edgeship.agent.protocol import (SCHEMA_VERSION, TRANSFER_OFFSET, TRANSFER_SCHEMA, TRANSFER_STATUS,
                            TRANSFER_TOTAL, TOPIC_ROOT, TransferRequest)
from edgeship.agent.update.transfer import RESUME_SUFFIX
from edgeship.demo import write_agent_config
from edgeship.fleet import tuf_repo
from edgeship.fleet.broker import free_port
from edgeship.fleet.transfer import ChunkResult, read_chunk
from tests.support.loop_env import predict


def edit_targets(repo: Path, keys: Path, mutate: Callable[[Targets], None], *,
                 targets_signer: CryptoSigner | None = None, sign: bool = True) -> None:
    """Change the current targets metadata and publish it: re-signed with the repository's
    targets key, with ``targets_signer`` (e.g. a stranger's key), or (``sign=False``) keeping
    the old, now invalid, signature. Snapshot and timestamp are properly re-signed."""
    cur = tuf_repo._load_current(repo / "metadata")
    signers = tuf_repo.load_signers(keys, cur.root.signed,
                                    (Targets.type, Snapshot.type, Timestamp.type))
    old_sigs = dict(cur.targets.signatures)
    mutate(cur.targets.signed)
    if targets_signer is not None:
        signers[Targets.type] = [targets_signer]
    settings = tuf_repo.RepoSettings()
    now = tuf_repo._utcnow()
    if sign:
        tuf_repo._commit(repo, cur, signers, settings, now, new_targets=True,
                         new_snapshot=True)
        return
    # unsigned variant: bump and write targets by hand with the stale signatures
    cur.targets.signed.version += 1
    cur.targets.signatures.clear()
    cur.targets.signatures.update(old_sigs)
    data = tuf_repo._write(repo / "metadata" / f"{cur.targets.signed.version}.targets.json",
                           cur.targets)
    cur.snapshot.signed.meta["targets.json"] = tuf_repo._meta_file(cur.targets.signed.version,
                                                                   data)
    tuf_repo._commit(repo, cur, signers, settings, now, new_targets=False, new_snapshot=True)


def release_full(env, bundle_dir: Path, announce: bool = False):
    """Release without deltas, so the device has to fetch (and verify) the full files."""
    info = tuf_repo.release_bundle(bundle_dir, env.repo, env.keys,
                                   tuf_repo.RepoSettings(deltas=False))
    if announce:
        env.announce(info.model, info.version)
    return info


def set_hardware(targets: Targets, model: str, version: int, hardware: list[str]) -> None:
    for path, info in targets.targets.items():
        if path.startswith(f"{model}/{version}/"):
            custom = info.unrecognized_fields["custom"]["edgeship"]
            if custom.get("kind") == "variant":
                custom["hardware"] = hardware


def start_agent(env, device: str, profile: str = "generic-x86_64", **overrides) -> Agent:
    """Like LoopEnv.start_agent, with config overrides (chunk size, rate cap, ...)."""
    state = env.root / "devices" / device
    if (state / "agent.toml").exists():
        path = state / "agent.toml"
    else:
        path = write_agent_config(state, device, env.url, profile, free_port(), 0.5, env.repo)
    cfg = load_config(path)
    if "trial_window_s" in {f.name for f in dataclasses.fields(cfg)}:
        overrides.setdefault("trial_window_s", 0.0)  # delivery tests need no live trial
    cfg = dataclasses.replace(cfg, **overrides)
    agent = Agent(cfg)
    agent.start()
    env.agents.append(agent)
    return agent


def restart(env, agent: Agent) -> Agent:
    agent.stop()
    env.agents.remove(agent)
    new = Agent(agent.cfg)
    new.start()
    env.agents.append(new)
    return new


def assert_untouched(agent: Agent, version: int, before: bytes, x, model: str = "digits"):
    """The attack changed nothing: same active model bytes, still serving, cache empty."""
    active = agent.store.active(model)
    assert active.version == version
    assert active.model_path.read_bytes() == before
    assert predict(agent, model, x)["version"] == version  # agent still up and serving
    left = [p.name for p in agent.cfg.downloads_dir.iterdir()]
    assert left == [], f"download cache not emptied: {left}"
    hidden = [p.name for p in (agent.cfg.models_dir / model).iterdir()
              if p.name.startswith(".")]
    assert hidden == []


def wait_event(env, device: str, event: str, version: int | None = None,
               timeout_s: float = 60) -> dict:
    return env.watcher.wait_for(lambda e: e.get("device") == device and
                                e.get("event") == event and
                                (version is None or e.get("version") == version), timeout_s)


class RogueResponder:
    """Answers transfer requests itself (the real fleet server is stopped), through
    ``mutate(request, honest_result) -> (payload, properties)`` — a man in the middle who
    got hold of the broker credentials of a fleet server."""

    def __init__(self, url: str, repo: Path,
                 mutate: Callable[[TransferRequest, ChunkResult], tuple[bytes, dict]]):
        self.repo, self.mutate = repo, mutate
        self.session = MqttSession(SessionSettings(
            url=url, client_id=f"rogue-{os.getpid()}-{id(self)}", clean_start=True,
            session_expiry_s=0), self._on_message)
        self.session.start([(f"{TOPIC_ROOT}/transfer/req/+", 1)])
        assert self.session.wait_subscribed(10)

    def _on_message(self, msg: Message) -> None:
        request = TransferRequest.from_bytes(msg.payload)
        honest = read_chunk(self.repo, request)
        payload, props = self.mutate(request, honest)
        self.session.publish(msg.response_topic, payload, qos=1,
                             correlation_data=msg.correlation_data, user_properties=props)

    def stop(self) -> None:
        self.session.stop()


def honest_props(result: ChunkResult) -> dict[str, str]:
    return {TRANSFER_SCHEMA: str(SCHEMA_VERSION), TRANSFER_STATUS: str(result.status),
            TRANSFER_OFFSET: str(result.offset), TRANSFER_TOTAL: str(result.total)}


def variant_target(repo: Path, version: int, name: str = "model.fp32.onnx",
                   model: str = "digits") -> Path:
    (match,) = [p for p in (repo / "targets" / model / str(version)).iterdir()
                if p.name.endswith("." + name)]
    return match


def events(env, device: str) -> list[dict]:
    return [e for e in env.watcher.events if e.get("device") == device]


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)



def resume_files(agent: Agent) -> list[Path]:
    """The agent's partial downloads (kept for resuming)."""
    return list(agent.cfg.downloads_dir.glob("*" + RESUME_SUFFIX))
