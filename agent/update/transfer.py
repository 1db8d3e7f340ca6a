"""Chunked file transfer over MQTT 5 request/response, and the TUF fetcher built on it.

Requests go to the fleet (shared subscription), each with a ResponseTopic and a fresh
CorrelationData; responses are raw bytes with user properties. A response whose
correlation data matches no outstanding request (another transfer's chunk, a replay) is
dropped and counted; a response larger than the chunk asked for is rejected before use.

Target files resume: the fetcher appends every chunk it receives to
``{resume_dir}/{name}.resume`` and, on the next attempt (after a disconnect that outlasted
the retries, or after an agent restart), replays those bytes and asks only for the rest.
TUF still verifies length and hash of the whole file afterwards.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, unquote

from tuf.api import exceptions as tuf_exc

from edgeship.agent import protocol
from edgeship.agent.update.fetcher_base import FetcherInterface  # not tuf.ngclient: ~11 MB until an update
from edgeship.agent.errors import Reason, TransferError
from edgeship.common.mqtt import Message

logger = logging.getLogger(__name__)

PublishFn = Callable[..., object]


@dataclass(frozen=True)
class TransferSettings:
    chunk_bytes: int = protocol.DEFAULT_CHUNK_BYTES
    request_timeout_s: float = 10.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    max_bytes_per_s: int = 0  # per-device byte-rate cap; 0 = unlimited
    window: int = 8  # chunk requests kept in flight per transfer (pipelining), at most
    busy_max_wait_s: float = 600.0  # how long to keep retrying a fleet at its transfer cap


#: Statuses the fleet answers besides 200 (see fleet/transfer.py).
STATUS_BUSY = 503  # fleet at its concurrent-transfer cap: retry with backoff
STATUS_STOPPED = 410  # kill switch: the release's transfers were stopped
RESUME_SUFFIX = ".resume"
MAX_ANSWERS_QUEUED = 4  # answers kept per outstanding request (one is expected)


class RateLimiter:
    """Token bucket over bytes; ``acquire`` sleeps until ``n`` bytes may be requested."""

    def __init__(self, bytes_per_s: int, clock=time.monotonic, sleep=time.sleep) -> None:
        self.rate = bytes_per_s
        self._clock, self._sleep = clock, sleep
        self._allowance = float(bytes_per_s)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._allowance = min(float(self.rate), self._allowance +
                                  (now - self._last) * self.rate)
            self._last = now
            self._allowance -= n
            wait_s = -self._allowance / self.rate if self._allowance < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)


@dataclass(frozen=True)
class Chunk:
    status: int
    offset: int
    total: int
    data: bytes
    error: str | None = None


def parse_chunk(msg: Message) -> Chunk:
    """Read a transfer response's user properties (the compact or the long form); raise
    TransferError when malformed."""
    props = msg.user_properties
    if protocol.TRANSFER_COMPACT in props:
        return _parse_compact(msg)
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


def _parse_compact(msg: Message) -> Chunk:
    props = msg.user_properties
    try:
        schema, status, offset, total = props[protocol.TRANSFER_COMPACT].split(" ")
        if schema != str(protocol.SCHEMA_VERSION):
            raise TransferError(f"transfer response schema {schema!r}",
                                reason_code=Reason.UNSUPPORTED_SCHEMA)
        return Chunk(status=int(status), offset=int(offset), total=int(total),
                     data=msg.payload, error=props.get(protocol.TRANSFER_ERROR))
    except ValueError as e:
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
        self._pending: dict[bytes, "queue.SimpleQueue[Message]"] = {}
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.unmatched_responses = 0
        self.bytes_received = 0
        self.oversized_responses = 0
        self.received_by_path: dict[str, int] = {}  # bounded: cleared past 1,000 paths
        self._limiter = RateLimiter(settings.max_bytes_per_s)

    @property
    def window(self) -> int:
        """Chunk requests kept in flight: ``settings.window``; under a byte-rate cap at most
        one second's worth (the cap, not the round trip, limits the speed then, and less in
        flight is less to fetch again if the agent dies mid-transfer)."""
        s = self.settings
        if s.max_bytes_per_s <= 0:
            return max(1, s.window)
        return max(1, min(s.window, s.max_bytes_per_s // s.chunk_bytes))

    @property
    def response_topic(self) -> str:
        return protocol.Topics.transfer_response(self.device)

    def on_response(self, msg: Message) -> None:
        """Called from paho's thread: hand the message over, never block."""
        waiter = self._pending.get(msg.correlation_data or b"")
        if waiter is None or waiter.qsize() >= MAX_ANSWERS_QUEUED:  # bounded: replays
            self.unmatched_responses += 1
            return
        waiter.put_nowait(msg)

    def request(self, path: str, offset: int, length: int) -> Chunk:
        """One chunk, with bounded retries and jittered backoff on timeouts; a busy fleet is
        waited for (jittered backoff, up to ``busy_max_wait_s``); a stopped release raises
        at once."""
        self._limiter.acquire(length)
        timeouts, busy_since = 0, None
        while True:
            try:
                chunk = self._request_once(path, offset, length)
            except TransferError as e:
                if e.reason_code != Reason.TRANSFER_TIMEOUT or \
                        timeouts >= self.settings.max_retries:
                    raise
                timeouts += 1
                self._pause(timeouts - 1, f"chunk {path}@{offset} timed out")
                continue
            if chunk.status == STATUS_STOPPED:
                raise TransferError(f"transfers of {path} were stopped by the fleet",
                                    reason_code=Reason.RELEASE_STOPPED, status=STATUS_STOPPED)
            if chunk.status != STATUS_BUSY:
                return chunk
            busy_since = busy_since if busy_since is not None else time.monotonic()
            if time.monotonic() - busy_since > self.settings.busy_max_wait_s:
                raise TransferError(f"fleet busy for over {self.settings.busy_max_wait_s}s",
                                    reason_code=Reason.TRANSFER_TIMEOUT, status=STATUS_BUSY)
            self._pause(min(timeouts + 3, 8), "fleet busy")

    def _pause(self, attempt: int, why: str) -> None:
        delay = backoff_s(attempt, self.settings.backoff_base_s, self.settings.backoff_max_s,
                          self._rng)
        logger.info("%s; retrying in %.1fs", why, delay)
        time.sleep(delay)

    def _request_once(self, path: str, offset: int, length: int) -> Chunk:
        pending = self._send(path, offset, length)
        try:
            return self._wait(pending)
        finally:
            self.cancel(pending)

    # --- pipelining: several requests in flight, answers matched by correlation data ----

    def prefetch(self, path: str, offset: int, length: int) -> "Pending":
        """Send a request now; :meth:`collect` its chunk later (or :meth:`cancel` it)."""
        self._limiter.acquire(length)
        return self._send(path, offset, length)

    def collect(self, pending: "Pending") -> Chunk:
        """The prefetched chunk; a timeout or a busy fleet falls back to :meth:`request`
        (bounded retries); a stopped release raises."""
        try:
            chunk = self._wait(pending)
        except TransferError as e:
            if e.reason_code != Reason.TRANSFER_TIMEOUT:
                raise
            chunk = None
        finally:
            self.cancel(pending)
        if chunk is None or chunk.status in (STATUS_BUSY, STATUS_STOPPED):
            return self.request(pending.path, pending.offset, pending.length)
        return chunk

    def cancel(self, pending: "Pending") -> None:
        with self._lock:
            self._pending.pop(pending.correlation, None)

    def _send(self, path: str, offset: int, length: int) -> "Pending":
        pending = Pending(path, offset, length, os.urandom(16), queue.SimpleQueue())
        with self._lock:
            self._pending[pending.correlation] = pending.waiter
        payload = protocol.TransferRequest(path, offset, length, compact=True).to_bytes()
        self._publish(protocol.Topics.transfer_request(self.device), payload, qos=1,
                      response_topic=self.response_topic,
                      correlation_data=pending.correlation)
        return pending

    def _wait(self, pending: "Pending") -> Chunk:
        path, offset, length = pending.path, pending.offset, pending.length
        try:
            msg = pending.waiter.get(timeout=self.settings.request_timeout_s)
        except queue.Empty:
            raise TransferError(f"no answer for {path}@{offset} within "
                                f"{self.settings.request_timeout_s}s",
                                reason_code=Reason.TRANSFER_TIMEOUT) from None
        if len(msg.payload) > length:  # checked before the response is parsed or used
            self.oversized_responses += 1
            raise TransferError(f"response of {len(msg.payload)} bytes for a {length}-byte "
                                f"chunk of {path}", reason_code=Reason.PAYLOAD_TOO_LARGE)
        chunk = parse_chunk(msg)
        self.bytes_received += len(chunk.data)
        if len(self.received_by_path) > 1000:
            self.received_by_path.clear()
        self.received_by_path[path] = self.received_by_path.get(path, 0) + len(chunk.data)
        return chunk


@dataclass(frozen=True)
class Pending:
    path: str
    offset: int
    length: int
    correlation: bytes
    waiter: "queue.SimpleQueue[Message]"  # C-level queue: no Condition per request


class MqttFetcher(FetcherInterface):
    """TUF's fetcher over MQTT: URLs look like ``mqtt://fleet/metadata/timestamp.json``.
    With ``resume_dir``, target files resume from the bytes already received."""

    PREFIX = "mqtt://fleet/"

    def __init__(self, client: TransferClient, resume_dir: Path | None = None) -> None:
        self._client = client
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self.bytes_resumed = 0  # bytes replayed from resume files instead of fetched
        self._max_bytes: dict[str, int] = {}  # url -> pinned length (+1), from TUF

    def download_file(self, url: str, max_length: int):
        """Remember TUF's pinned length so no chunk beyond it is ever requested."""
        self._max_bytes = {url: max_length + 1}  # +1: let TUF see (and reject) excess
        return super().download_file(url, max_length)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(self.PREFIX):
            raise tuf_exc.DownloadError(f"not an edgeship MQTT URL: {url}")
        path = url[len(self.PREFIX):]
        part = self._resume_path(path)
        offset = part.stat().st_size if part is not None and part.exists() else 0
        first = self._get(path, offset)
        if first.status == 416 and offset:  # the resume file is longer than the file
            discard_resume(part)
            offset, first = 0, self._get(path, 0)
        if first.status != 200:
            raise tuf_exc.DownloadHTTPError(f"{first.status} for {path}", first.status)
        return self._stream(path, first, part, offset, self._max_bytes.get(url))

    def _resume_path(self, path: str) -> Path | None:
        if self.resume_dir is None or not path.startswith("targets/"):
            return None
        return self.resume_dir / (quote(path, safe="") + RESUME_SUFFIX)

    def _get(self, path: str, offset: int) -> Chunk:
        try:
            return self._client.request(path, offset, self._client.settings.chunk_bytes)
        except TransferError as e:
            raise tuf_exc.DownloadError(str(e)) from e

    def _collect(self, pending: Pending) -> Chunk:
        try:
            return self._client.collect(pending)
        except TransferError as e:
            raise tuf_exc.DownloadError(str(e)) from e

    def _stream(self, path: str, first: Chunk, part: Path | None, offset: int,
                max_bytes: int | None) -> Iterator[bytes]:
        out = open(part, "ab") if part is not None else None
        complete = False
        window: collections.deque[Pending] = collections.deque()  # requests in flight
        try:
            if offset and part is not None:
                yield from self._replay(part, offset)
            chunk = first
            size = self._client.settings.chunk_bytes
            ahead = offset + len(first.data)  # next offset to request
            limit = min(first.total, max_bytes) if max_bytes else first.total
            while True:
                if chunk.status != 200 or chunk.offset != offset or chunk.total != first.total \
                        or (not chunk.data and offset < first.total):
                    raise tuf_exc.DownloadError(f"bad chunk for {path} at {offset}")
                while len(window) < self._client.window and ahead < limit:
                    window.append(self._client.prefetch(path, ahead, size))
                    ahead += size
                if out is not None:
                    out.write(chunk.data)
                    out.flush()
                offset += len(chunk.data)
                yield chunk.data
                if offset >= limit:
                    break
                chunk = self._collect(window.popleft())
            complete = True
        except tuf_exc.DownloadError as e:
            if isinstance(e.__cause__, TransferError) and e.__cause__.reason_code in (
                    Reason.RELEASE_STOPPED, Reason.PAYLOAD_TOO_LARGE,
                    Reason.MALFORMED_MESSAGE, Reason.UNSUPPORTED_SCHEMA):
                complete = True  # nothing worth resuming
            raise
        except GeneratorExit:  # TUF stopped reading (e.g. more bytes than pinned)
            complete = True
            raise
        finally:  # keep a partial file after transient trouble; drop it otherwise
            for pending in window:
                self._client.cancel(pending)
            if out is not None:
                out.close()
                if complete:
                    discard_resume(part)

    def _replay(self, part: Path, size: int) -> Iterator[bytes]:
        with open(part, "rb") as f:
            left = size
            while left > 0 and (block := f.read(min(left, 1 << 20))):
                left -= len(block)
                self.bytes_resumed += len(block)
                yield block


def resume_target(part: Path) -> tuple[str, int] | None:
    """(model, version) of a resume file: the quoted target path, ``targets/{model}/
    {version}/…`` over MQTT, ``{model}/{version}/…`` over HTTP; None if neither."""
    parts = unquote(part.name.removesuffix(RESUME_SUFFIX)).split("/")
    parts = parts[1:] if parts[0] == "targets" else parts
    if len(parts) >= 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def discard_resume(part: Path | None) -> None:
    if part is not None:
        part.unlink(missing_ok=True)


def discard_all_resume(downloads_dir: Path) -> None:
    """After a verification failure: no partial file of a rejected target may be reused."""
    for part in Path(downloads_dir).glob("*" + RESUME_SUFFIX):
        part.unlink(missing_ok=True)
