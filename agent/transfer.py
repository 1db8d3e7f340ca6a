"""Chunked file transfer over MQTT 5 request/response, and the TUF fetcher built on it.

Requests go to the fleet (shared subscription), each with a ResponseTopic and a fresh
CorrelationData; responses are raw bytes with user properties. A response whose
correlation data matches no outstanding request (another transfer's chunk, a replay) is
dropped and counted.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from agent import protocol
from agent.errors import Reason, TransferError
from agent.mqtt import Message

logger = logging.getLogger(__name__)

PublishFn = Callable[..., object]


@dataclass(frozen=True)
class TransferSettings:
    chunk_bytes: int = protocol.DEFAULT_CHUNK_BYTES
    request_timeout_s: float = 10.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0


@dataclass(frozen=True)
class Chunk:
    status: int
    offset: int
    total: int
    data: bytes
    error: str | None = None


def parse_chunk(msg: Message) -> Chunk:
    """Read a transfer response's user properties; raise TransferError when malformed."""
    props = msg.user_properties
    try:
        if props.get(protocol.TRANSFER_SCHEMA) != str(protocol.SCHEMA_VERSION):
            raise TransferError(f"transfer response schema {props.get('schema')!r}",
                                reason_code=Reason.UNSUPPORTED_SCHEMA)
        return Chunk(status=int(props[protocol.TRANSFER_STATUS]),
                     offset=int(props.get(protocol.TRANSFER_OFFSET, "0")),
                     total=int(props.get(protocol.TRANSFER_TOTAL, "0")),
                     data=msg.payload, error=props.get(protocol.TRANSFER_ERROR))
    except (KeyError, ValueError) as e:
        raise TransferError(f"malformed transfer response: {e!r}",
                            reason_code=Reason.MALFORMED_MESSAGE) from e


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter."""
    return rng.uniform(0, min(max_s, base_s * (2 ** attempt)))


class TransferClient:
    """Sends chunk requests and matches responses by correlation data."""

    def __init__(self, device: str, publish: PublishFn, settings: TransferSettings) -> None:
        self.device = device
        self._publish = publish
        self.settings = settings
        self._pending: dict[bytes, "queue.Queue[Message]"] = {}
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.unmatched_responses = 0
        self.bytes_received = 0

    @property
    def response_topic(self) -> str:
        return protocol.Topics.transfer_response(self.device)

    def on_response(self, msg: Message) -> None:
        """Called from paho's thread: hand the message over, never block."""
        waiter = self._pending.get(msg.correlation_data or b"")
        if waiter is None:
            self.unmatched_responses += 1
            return
        waiter.put_nowait(msg)

    def request(self, path: str, offset: int, length: int) -> Chunk:
        """One chunk, with bounded retries and jittered backoff on timeouts."""
        for attempt in range(self.settings.max_retries + 1):
            try:
                return self._request_once(path, offset, length)
            except TransferError as e:
                if e.reason_code != Reason.TRANSFER_TIMEOUT or \
                        attempt == self.settings.max_retries:
                    raise
                delay = backoff_s(attempt, self.settings.backoff_base_s,
                                  self.settings.backoff_max_s, self._rng)
                logger.info("chunk %s@%d timed out, retry %d in %.1fs", path, offset,
                            attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _request_once(self, path: str, offset: int, length: int) -> Chunk:
        correlation = os.urandom(16)
        waiter: "queue.Queue[Message]" = queue.Queue(maxsize=4)
        with self._lock:
            self._pending[correlation] = waiter
        try:
            payload = protocol.TransferRequest(path, offset, length).to_bytes()
            self._publish(protocol.Topics.transfer_request(self.device), payload, qos=1,
                          response_topic=self.response_topic, correlation_data=correlation)
            try:
                msg = waiter.get(timeout=self.settings.request_timeout_s)
            except queue.Empty:
                raise TransferError(f"no answer for {path}@{offset} within "
                                    f"{self.settings.request_timeout_s}s",
                                    reason_code=Reason.TRANSFER_TIMEOUT) from None
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        chunk = parse_chunk(msg)
        self.bytes_received += len(chunk.data)
        return chunk


class MqttFetcher(FetcherInterface):
    """TUF's fetcher over MQTT: URLs look like ``mqtt://fleet/metadata/timestamp.json``."""

    PREFIX = "mqtt://fleet/"

    def __init__(self, client: TransferClient) -> None:
        self._client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(self.PREFIX):
            raise tuf_exc.DownloadError(f"not an edgeship MQTT URL: {url}")
        path = url[len(self.PREFIX):]
        try:
            first = self._client.request(path, 0, self._client.settings.chunk_bytes)
        except TransferError as e:
            raise tuf_exc.DownloadError(str(e)) from e
        if first.status != 200:
            raise tuf_exc.DownloadHTTPError(f"{first.status} for {path}", first.status)
        return self._rest(path, first)

    def _rest(self, path: str, first: Chunk) -> Iterator[bytes]:
        yield first.data
        offset = len(first.data)
        while offset < first.total:
            try:
                chunk = self._client.request(path, offset, self._client.settings.chunk_bytes)
            except TransferError as e:
                raise tuf_exc.DownloadError(str(e)) from e
            if chunk.status != 200 or chunk.offset != offset or not chunk.data \
                    or chunk.total != first.total:
                raise tuf_exc.DownloadError(f"bad chunk for {path} at {offset}")
            offset += len(chunk.data)
            yield chunk.data
