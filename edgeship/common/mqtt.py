"""The only module that imports paho. MQTT 5, callback API version 2.

paho's callbacks run on paho's network thread. They never block and never take an
application lock: they hand each message to the owner's ``on_message`` (which must be
just as quick, e.g. ``queue.put_nowait``) and hand PUBACK reason codes to the waiter
registered for that message id (a lock held only for a dict operation guards the table).
Subscriptions are re-made on every (re)connect.

By default each session runs paho's own network thread. A :class:`SharedLoop` instead
drives the sockets of many sessions from one selector thread through paho's external-loop
API (``loop_read``/``loop_write``/``loop_misc``): a gateway, or a simulator with hundreds of
agents per process, pays one network thread instead of one per connection.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeship.agent.errors import ConfigError, TransferError, Reason

logger = logging.getLogger(__name__)

#: Reconnect backoff bounds: the one definition (the agent's config defaults to these too).
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 60.0
#: PUBACKs that arrived before ``publish_acked`` registered its waiter (a fast broker), kept
#: for it; far fewer than the 65,535 message ids, so an entry never outlives its id's reuse.
MAX_EARLY_ACKS = 1024


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigError(f"bad MQTT URL {url!r}: expected mqtt://host:port or "
                              "mqtts://host:port", key="mqtt_url")
        default = 8883 if parsed.scheme == "mqtts" else 1883
        return cls(parsed.hostname, parsed.port or default, parsed.scheme == "mqtts")


@dataclass(frozen=True)
class Message:
    """An inbound message, decoupled from paho's types."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionSettings:
    url: str
    client_id: str
    clean_start: bool = False
    session_expiry_s: int = 24 * 3600
    keepalive_s: int = 30
    reconnect_min_s: float = RECONNECT_MIN_S
    reconnect_max_s: float = RECONNECT_MAX_S
    tls: TlsSettings | None = None
    will: tuple[str, bytes, bool] | None = None  # topic, payload, retain


class Backoff:
    """Capped exponential backoff with jitter (pure; ``rng`` injectable for tests).

    Attempt n waits a uniform draw from [base/2, base] with base = min(max, min * 2**n):
    a fleet that lost its broker at the same instant does not come back in lock-step."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ConfigError(f"backoff needs 0 < min ({min_s}) <= max ({max_s})",
                              key="reconnect_min_s")
        self.min_s, self.max_s = min_s, max_s
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay_s(self) -> float:
        base = min(self.max_s, self.min_s * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng.uniform(base / 2, base)

    def reset(self) -> None:
        self.attempt = 0


class MqttSession:
    """A persistent MQTT 5 session that (re)subscribes on every connect."""

    def __init__(self, settings: SessionSettings,
                 on_message: Callable[[Message], None],
                 on_connect: Callable[[], None] | None = None,
                 loop: "SharedLoop | None" = None) -> None:
        self.settings = settings
        self._loop = loop  # None: paho's own network thread
        self._address = BrokerAddress.parse(settings.url)
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._subscriptions: list[tuple[str, int]] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._ack_lock = threading.Lock()  # guards the two tables below, never held long
        self._ack_waiters: dict[int, _Ack] = {}  # mid -> its publish_acked waiter
        self._early_acks: OrderedDict[int, int] = OrderedDict()  # mid -> reason code
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.reconnects = 0
        # what `agent status` and /healthz say about the broker (wall-clock seconds)
        self.last_contact: float | None = None  # CONNACK or a message from the broker
        self.next_retry_at: float | None = None
        self.last_error: str | None = None
        self._stopping = False
        self._client = self._build_client()
        if loop is not None:
            loop.attach(self._client)

    # --- setup -----------------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=paho.MQTTv5)
        # paho waits min(2 * previous, max) between attempts, without jitter: before each
        # wait we set both bounds to our next jittered delay (see _schedule_retry).
        _set_delay(client, s.reconnect_min_s)
        client.max_queued_messages_set(10_000)
        if s.tls is not None or self._address.tls:
            if s.tls is None:
                raise ConfigError("mqtts:// needs tls settings (ca_file)", key="tls")
            client.tls_set(ca_certs=s.tls.ca_file, certfile=s.tls.cert_file,
                           keyfile=s.tls.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if s.will is not None:
            topic, payload, retain = s.will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def start(self, subscriptions: Iterable[tuple[str, int]] = ()) -> None:
        self._subscriptions = list(subscriptions)
        self._stopping = False
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self._client.connect_async(self._address.host, self._address.port,
                                   keepalive=self.settings.keepalive_s,
                                   clean_start=self.settings.clean_start, properties=props)
        if self._loop is None:
            self._client.loop_start()
        else:
            self._loop.call_soon(self._connect_on_loop)

    def _connect_on_loop(self) -> None:
        """Shared-loop mode (loop thread): open the socket and send CONNECT; on failure,
        try again after the jittered backoff (paho's own thread would do this)."""
        if self._stopping:
            return
        try:
            self._client.reconnect()
        except (OSError, ssl.SSLError) as e:
            self._schedule_retry(str(e) or type(e).__name__)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the broker acknowledged this connection's subscriptions."""
        return self._subscribed.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, *, final: tuple[str, bytes, bool] | None = None) -> None:
        """Publish ``final`` (e.g. an offline presence) if connected, then disconnect."""
        if final is not None and self.connected:
            try:
                self.publish(final[0], final[1], retain=final[2]).wait_for_publish(2.0)
            except (RuntimeError, ValueError) as e:
                logger.debug("final publish failed: %s", e)
        self._stopping = True
        self._client.disconnect()
        if self._loop is None:
            self._client.loop_stop()
        else:
            self._loop.detach(self._client, wait_s=2.0)
        self._connected.clear()

    # --- publishing ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                user_properties: dict[str, str] | None = None,
                message_expiry_s: int | None = None) -> paho.MQTTMessageInfo:
        """Queue a publish; never blocks. Returns paho's handle (``.mid``)."""
        props = None
        if response_topic or correlation_data or user_properties or message_expiry_s:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
            if user_properties:
                props.UserProperty = list(user_properties.items())
            if message_expiry_s:
                props.MessageExpiryInterval = message_expiry_s
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def publish_acked(self, topic: str, payload: bytes, *, timeout_s: float,
                      qos: int = 1, retain: bool = False) -> int:
        """Publish and wait for the PUBACK; return its MQTT 5 reason code (0 = success,
        >= 0x80 = refused). Raises TransferError on timeout or when not connected."""
        info = self.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise TransferError(f"publish to {topic} not sent (rc={info.rc})",
                                reason_code=Reason.TRANSFER_FAILED)
        ack = _Ack()
        with self._ack_lock:  # the PUBACK may have come already: then it waits in _early
            ack.code = self._early_acks.pop(info.mid, None)
            if ack.code is None:
                self._ack_waiters[info.mid] = ack
        try:
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as e:
                raise TransferError(f"publish to {topic} failed: {e}") from e
            if not info.is_published():
                raise TransferError(f"no PUBACK for {topic} within {timeout_s}s",
                                    reason_code=Reason.TRANSFER_TIMEOUT)
            with self._ack_lock:  # paho calls on_publish before it marks the info published
                code = ack.code
            if code is None:
                raise TransferError(f"the PUBACK for {topic} carried no reason code")
            return code
        finally:
            with self._ack_lock:
                self._ack_waiters.pop(info.mid, None)

    # --- paho callbacks (paho's thread: hand over, never block) ----------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            logger.warning("MQTT connect to %s refused: %s", self.settings.url, reason_code)
            return
        self.last_contact, self.next_retry_at, self.last_error = time.time(), None, None
        logger.info("MQTT connected to %s:%s as %s", self._address.host, self._address.port,
                    self.settings.client_id)
        _set_nodelay(client.socket())  # issue 3: no Nagle delay on request/response
        self.backoff.reset()
        _set_delay(self._client, self.settings.reconnect_min_s)
        self._subscribed.clear()
        if self._subscriptions:
            opts = [(t, SubscribeOptions(qos=q)) for t, q in self._subscriptions]
            client.subscribe(opts)
        else:
            self._subscribed.set()
        self._connected.set()
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        logger.info("MQTT disconnected: %s", reason_code)
        self._schedule_retry(f"disconnected: {reason_code}")

    def _handle_connect_fail(self, client, userdata) -> None:
        self._schedule_retry("cannot connect (broker down, unreachable, or TLS refused)")

    def _schedule_retry(self, why: str) -> None:
        if self._stopping:
            return
        delay_s = self.backoff.next_delay_s()
        self.reconnects += 1
        self.last_error = why
        self.next_retry_at = time.time() + delay_s
        logger.warning("MQTT %s: %s; next try in %.1f s (%s)", self.settings.url, why,
                       delay_s, time.strftime("%H:%M:%S", time.localtime(self.next_retry_at)))
        if self._loop is not None:
            self._loop.call_later(delay_s, self._connect_on_loop)
        else:
            _set_delay(self._client, delay_s)  # a lock and two floats

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            logger.warning("broker refused %d subscription(s): %s", len(refused), refused)
        self._subscribed.set()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack_lock:
            ack = self._ack_waiters.get(mid)
            if ack is not None:
                ack.code = reason_code.value
                return
            self._early_acks[mid] = reason_code.value  # nobody waits (yet): bounded
            while len(self._early_acks) > MAX_EARLY_ACKS:
                self._early_acks.popitem(last=False)

    def state(self) -> dict[str, object]:
        """The connection as a person reads it: state, broker, last contact, next try."""
        state = "connected" if self.connected else "stopped" if self._stopping else \
            "waiting to retry" if self.next_retry_at else "connecting"
        return {"state": state, "url": self.settings.url, "last_contact": self.last_contact,
                "next_retry_at": None if self.connected else self.next_retry_at,
                "error": None if self.connected else self.last_error,
                "reconnects": self.reconnects}

    def _handle_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        self.last_contact = time.time()
        props = msg.properties
        user = {}
        response_topic = correlation = None
        if props is not None:
            user = {k: v for k, v in getattr(props, "UserProperty", []) or []}
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        self._on_message_cb(Message(topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos,
                                    retain=bool(msg.retain), response_topic=response_topic,
                                    correlation_data=correlation, user_properties=user))


def _set_delay(client: paho.Client, delay_s: float) -> None:
    """paho's next reconnect waits exactly ``delay_s`` (paho annotates int; it takes float)."""
    client.reconnect_delay_set(delay_s, delay_s)  # type: ignore[arg-type]


class _Ack:
    """One ``publish_acked`` waiting for the PUBACK of its message id."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code: int | None = None


def _set_nodelay(sock) -> None:
    """Chunk request/response is stop-and-wait: without TCP_NODELAY each small request
    waits for the peer's delayed ACK (~40 ms on Linux), capping throughput."""
    import socket as _socket
    try:
        raw = getattr(sock, "_sock", sock)  # unwrap paho's websocket wrapper, if any
        raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as e:
        logger.debug("TCP_NODELAY not set: %s", e)


class SharedLoop:
    """One thread runs the network I/O of many :class:`MqttSession` objects (each keeps its
    own client id, socket, session and keepalive) through paho's external-loop API.

    Selector state is touched only on the loop thread; other threads hand work over with
    :meth:`call_soon` (a lock, a deque and a wake-up byte). Every ``misc_interval_s`` each
    client gets ``loop_misc`` (keepalive PINGREQs, keepalive timeouts)."""

    def __init__(self, *, misc_interval_s: float = 1.0, name: str = "edgeship-mqtt-shared"):
        self.misc_interval_s = misc_interval_s
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # loop thread only
        self._order = itertools.count()
        self._clients: set[paho.Client] = set()  # loop thread only
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        if self._on_loop():
            fn()
            return
        with self._lock:
            self._calls.append(fn)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (buffer full) or the loop closed

    def attach(self, client: paho.Client) -> None:
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        self.call_soon(lambda: self._clients.add(client))

    def detach(self, client: paho.Client, *, wait_s: float) -> None:
        """Stop driving ``client``, after up to ``wait_s`` for its queued packets (e.g. a
        DISCONNECT) to leave and its socket to close."""
        deadline = time.monotonic() + wait_s
        while client.socket() is not None and time.monotonic() < deadline \
                and not self._on_loop():
            time.sleep(0.01)

        def drop() -> None:
            self._clients.discard(client)
            sock = client.socket()
            if sock is not None:
                self._unregister(sock)
                client._sock_close()  # noqa: SLF001 - paho has no public close
        self.call_soon(drop)

    def stop(self) -> None:
        self._stopped = True
        self.call_soon(lambda: None)
        self._thread.join(timeout=5)

    # --- loop thread -----------------------------------------------------------------

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.call_soon(lambda: heapq.heappush(
            self._timers, (time.monotonic() + delay_s, next(self._order), fn)))

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _run(self) -> None:
        next_misc = time.monotonic() + self.misc_interval_s
        while not self._stopped:
            now = time.monotonic()
            timeout_s = min(next_misc, self._timers[0][0] if self._timers else next_misc) - now
            for key, events in self._selector.select(max(0.0, timeout_s)):
                self._ready(key, events)
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard(heapq.heappop(self._timers)[2])
            if now >= next_misc:
                next_misc = now + self.misc_interval_s
                for client in list(self._clients):
                    self._guard(client.loop_misc)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _ready(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data is None:  # the wake-up socket
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            return
        client: paho.Client = key.data
        if events & selectors.EVENT_READ:
            self._guard(client.loop_read)
        if events & selectors.EVENT_WRITE and client.socket() is key.fileobj:
            self._guard(client.loop_write)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, deque()
        for fn in calls:
            self._guard(fn)

    @staticmethod
    def _guard(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # one client's failure must not stop the others' network
            logger.exception("shared MQTT loop: %s failed", getattr(fn, "__name__", fn))

    def _set_events(self, sock, client: paho.Client, events: int) -> None:
        try:
            self._selector.modify(sock, events, client)
        except (KeyError, ValueError):
            if sock.fileno() >= 0:
                self._selector.register(sock, events, client)

    def _unregister(self, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # --- paho's socket callbacks -------------------------------------------------------

    def _socket_open(self, client, userdata, sock) -> None:
        self.call_soon(lambda: self._set_events(sock, client, selectors.EVENT_READ))

    def _socket_close(self, client, userdata, sock) -> None:
        self.call_soon(lambda: self._unregister(sock))

    def _register_write(self, client, userdata, sock) -> None:
        self.call_soon(lambda: self._set_events(
            sock, client, selectors.EVENT_READ | selectors.EVENT_WRITE)
            if client.socket() is sock else None)

    def _unregister_write(self, client, userdata, sock) -> None:
        def apply() -> None:
            if client.socket() is not sock:
                return
            if client.want_write():  # a publish raced with the drain: keep writing
                client._registered_write = True  # noqa: SLF001 - paho's own flag
                return
            self._set_events(sock, client, selectors.EVENT_READ)
        self.call_soon(apply)
