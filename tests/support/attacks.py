"""A hostile client on the broker, for the hardening tests and ``scripts/soak-agent``: it
speaks the wire protocol (or breaks it on purpose) as one device id, with the credentials
that device would have on a locked-down broker."""

from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Any

from edgeship.agent.mqtt import Message, MqttSession, SessionSettings, TlsSettings
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
