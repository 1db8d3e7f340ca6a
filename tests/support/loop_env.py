"""A real fleet on one machine for integration tests: a TUF repository, an in-process
FleetServer and in-process Agents, all talking through a real Mosquitto."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from edgeship.agent import protocol
from edgeship.agent.daemon import Agent
from edgeship.common.mqtt import Message, MqttSession, SessionSettings
from edgeship.agent.protocol import Topics
from edgeship.demo import write_agent_config
from edgeship.fleet.broker import free_port
from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.tuf_repo import init_repository, release_bundle


class Watcher:
    """Records every status event and presence message seen on the broker."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self.session = MqttSession(SessionSettings(url=url, client_id=f"watch-{os.getpid()}"
                                                   f"-{id(self)}", clean_start=True,
                                                   session_expiry_s=0), self._on_message)
        self.session.start([(Topics.DEVICE_STATUS_FILTER, 1)])
        assert self.session.wait_subscribed(10)

    def _on_message(self, msg: Message) -> None:
        with self._cv:
            self.events.append(json.loads(msg.payload))
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool],
                 timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event in {timeout_s}s; saw "
                                         f"{self.events}")
                self._cv.wait(left)

    def chain(self, device: str, version: int) -> list[str]:
        return [e["event"] for e in self.events
                if e.get("device") == device and e.get("version") == version]


class LoopEnv:
    def __init__(self, broker_url: str, root: Path) -> None:
        self.url = broker_url
        self.root = root
        self.keys, self.repo = root / "keys", root / "repo"
        init_repository(self.keys, self.repo)
        self.fleet = FleetServer(FleetSettings(mqtt_url=broker_url, repo_dir=self.repo,
                                               db_path=root / "fleet.db"))
        self.fleet.start()
        self.watcher = Watcher(broker_url)
        self.agents: list[Agent] = []

    def release(self, bundle_dir: Path, announce: bool = True):
        info = release_bundle(bundle_dir, self.repo, self.keys)
        if announce:
            self.announce(info.model, info.version)
        return info

    def announce(self, model: str, version: int) -> None:
        self.publish(Topics.release(model),
                     protocol.ReleaseAnnouncement(model, version, time.time()).to_bytes(),
                     retain=True)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.watcher.session.publish_acked(topic, payload, retain=retain, timeout_s=10)

    def start_agent(self, device: str, profile: str = "generic-x86_64") -> Agent:
        path = write_agent_config(self.root / "devices" / device, device, self.url, profile,
                                  free_port(), 0.5, self.repo)
        from edgeship.agent.config import load_config
        agent = Agent(load_config(path))
        agent.start()
        self.agents.append(agent)
        return agent

    def wait_serving(self, device: str, version: int, timeout_s: float = 60) -> dict:
        return self.watcher.wait_for(lambda e: e.get("device") == device and
                                     e.get("event") == "serving" and
                                     e.get("version") == version, timeout_s)

    def wait_failed(self, device: str, version: int, timeout_s: float = 60) -> dict:
        return self.watcher.wait_for(lambda e: e.get("device") == device and
                                     e.get("event") == "failed" and
                                     e.get("version") == version, timeout_s)

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        self.fleet.stop()
        self.watcher.session.stop()


def predict(agent: Agent, model: str, x) -> dict[str, Any]:
    body = json.dumps({"inputs": x.tolist()}).encode()
    req = urllib.request.Request(f"{agent.api.url}/v1/models/{model}/predict", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class Fleet:
    """A TUF repository + fleet server (``LoopEnv``) and helpers to release test models."""

    def __init__(self, env, root) -> None:
        self.env = env
        self.root = root
        self._n = itertools.count()

    def release(self, model: str, version: int, onnx_model, k: int | None = None,
                announce: bool = True, **bundle_options):
        from tests.support import models  # onnx: host-side only

        bundle = models.write_bundle(self.root / "bundles" / f"{model}-{version}-"
                                     f"{next(self._n)}", model, version, onnx_model, k,
                                     **bundle_options)
        self.env.release(bundle, announce=announce)
        return bundle

    def events(self, device: str, version: int | None = None, model: str | None = None,
               since: int = 0) -> list[dict]:
        """In the order the agent sent them (its timestamps): messages queued while it was
        offline may reach the broker after newer ones."""
        found = [e for e in self.env.watcher.events[since:] if e.get("device") == device and
                 (version is None or e.get("version") == version) and
                 (model is None or e.get("model") == model)]
        return sorted(found, key=lambda e: e.get("ts", 0))

    def chain(self, device: str, version: int, since: int = 0) -> list[str]:
        return [e["event"] for e in self.events(device, version, since=since)]
