"""A hostile client on the broker, for the hardening tests and ``scripts/soak-agent``: it
speaks the wire protocol (or breaks it on purpose) as one device id, with the credentials
that device would have on a locked-down broker."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import threading
from pathlib import Path
from typing import Any

from edgeship.common.mqtt import Message, MqttSession, SessionSettings, TlsSettings
from edgeship.agent.protocol import (TRANSFER_COMPACT, TRANSFER_STATUS, Topics,
                                     TransferRequest)


class RawDevice:
    """An MQTT 5 session that claims to be ``device``: sends transfer requests and raw
    payloads, collects transfer answers by correlation id."""

    def __init__(self, url: str, device: str, tls: TlsSettings | None = None,
                 client_id: str | None = None) -> None:
        self.device = device
        self._ids = itertools.count()
        self._answers: dict[bytes, queue.Queue] = {}
        self._lock = threading.Lock()
        self.session = MqttSession(
            SessionSettings(url=url, client_id=client_id or f"{device}-raw-{os.getpid()}",
                            clean_start=True, session_expiry_s=0, tls=tls), self._on_message)
        self.session.start([(Topics.transfer_response(device), 1)])
        if not self.session.wait_subscribed(10):
            raise RuntimeError(f"{device}: could not subscribe on {url}")

    def _on_message(self, msg: Message) -> None:
        with self._lock:
            box = self._answers.get(msg.correlation_data or b"")
        if box is not None:
            box.put(msg)

    def send_request(self, path: str, offset: int = 0, length: int = 1) -> bytes:
        """Send a transfer request without waiting; returns its correlation id."""
        corr = f"{self.device}-{next(self._ids)}".encode()
        with self._lock:
            self._answers[corr] = queue.Queue(maxsize=1)
        self.session.publish(Topics.transfer_request(self.device),
                             TransferRequest(path, offset, length, compact=True).to_bytes(),
                             response_topic=Topics.transfer_response(self.device),
                             correlation_data=corr)
        return corr

    def answer(self, corr: bytes, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """(status, data) of the answer to ``corr``; AssertionError on timeout."""
        with self._lock:
            box = self._answers[corr]
        try:
            msg = box.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no transfer answer for {corr!r} in {timeout_s}s") from None
        finally:
            with self._lock:
                self._answers.pop(corr, None)
        return _status(msg.user_properties), msg.payload

    def fetch(self, path: str, offset: int = 0, length: int = 1,
              timeout_s: float = 10.0) -> tuple[int, bytes]:
        return self.answer(self.send_request(path, offset, length), timeout_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        return self.session.publish_acked(topic, payload, timeout_s=10, retain=retain)

    def close(self) -> None:
        self.session.stop()


def _status(props: Any) -> int:
    props = dict(props or ())
    if TRANSFER_COMPACT in props:
        return int(props[TRANSFER_COMPACT].split()[1])
    return int(props[TRANSFER_STATUS])


# --- hostile manifests --------------------------------------------------------------------

def snapshot(repo_dir: Path) -> dict[str, str]:
    """Every file and directory under the repository (but its lock), with content hashes."""
    state = {}
    for p in sorted(repo_dir.rglob("*")):
        rel = str(p.relative_to(repo_dir))
        if rel == ".lock":
            continue
        state[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def edit_manifest(bundle: Path, edit) -> None:
    """Apply one of :data:`BAD_MANIFESTS` to a bundle directory."""
    raw = json.loads((bundle / "manifest.json").read_bytes())
    text = edit(raw, bundle)
    (bundle / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(raw))


def _rename_variant(new_name: str):
    """The variant's file really carries the hostile name, so only the name is at fault."""
    def edit(raw: dict, bundle: Path) -> None:
        (bundle / raw["variants"][0]["file"]).rename(bundle / new_name)
        raw["variants"][0]["file"] = new_name
    return edit


def _text(edit):
    return lambda raw, bundle: edit(json.dumps(raw))


def _version(literal: str):
    return _text(lambda t: re.sub(r'"version": \d+', f'"version": {literal}', t, count=1))


def _set(path: tuple, value):
    def edit(raw: dict, bundle: Path) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


#: What an attacker (or a careless hand) puts in a manifest; ``release`` must refuse each
#: with one line and exit 2, leaving the repository as it was.
BAD_MANIFESTS = {
    "version 2^64": _version(str(2**64)),
    "version 2^63": _version(str(2**63)),
    "version of 5000 digits": _version("9" * 5000),
    "30k-deep labels": _text(lambda t: t.replace('"labels": []', '"labels": ' +
                                                 "[" * 30_000 + "]" * 30_000)),
    "U+202E in a file name": _rename_variant("evil\u202exnno.onnx"),
    "newline in a file name": _rename_variant("a\nb.onnx"),
    "variant named installed.json": _rename_variant("installed.json"),
    "variant named like a resume file": _rename_variant("model.onnx.resume"),
    "golden_atol NaN literal": _text(lambda t: t.replace('"golden_atol": 0.0001',
                                                         '"golden_atol": NaN')),
    "golden_atol 'NaN' string": _set(("variants", 0, "golden_atol"), "NaN"),
    "negative golden_atol": _set(("variants", 0, "golden_atol"), -1.0),
    "metric 'inf' string": _set(("variants", 0, "metrics"), {"accuracy": "inf"}),
    "shape [-7]": _set(("inputs", 0, "shape"), [-7]),
    "shape not a list": _set(("inputs", 0, "shape"), "8x8"),
    "shape dim true": _set(("inputs", 0, "shape"), [True, 4]),
    "negative size": _set(("golden", "size"), -5),
    "hardware with a newline": _set(("variants", 0, "hardware"), ["x86_64\nrm -rf"]),
    "tensor name with U+202E": _set(("outputs", 0, "name"), "y\u202e"),
    "duplicate input names": lambda raw, bundle: raw["inputs"].append(dict(raw["inputs"][0])),
}
