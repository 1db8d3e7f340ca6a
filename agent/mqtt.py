"""The only module that imports paho. MQTT 5, callback API version 2.

paho's callbacks run on paho's network thread. They never block and never take an
application lock: they hand each message to the owner's ``on_message`` (which must be
just as quick, e.g. ``queue.put_nowait``) and record PUBACK reason codes.
Subscriptions are re-made on every (re)connect.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import ConfigError, TransferError, Reason

logger = logging.getLogger(__name__)


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
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
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
                 on_connect: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._address = BrokerAddress.parse(settings.url)
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._subscriptions: list[tuple[str, int]] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._acks: dict[int, int] = {}  # mid -> MQTT 5 reason code value
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.reconnects = 0
        self._client = self._build_client()

    # --- setup -----------------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=paho.MQTTv5)
        # paho waits min(2 * previous, max) between attempts, without jitter: before each
        # wait we set both bounds to our next jittered delay (see _schedule_retry).
        client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_min_s)
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
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self._client.connect_async(self._address.host, self._address.port,
                                   keepalive=self.settings.keepalive_s,
                                   clean_start=self.settings.clean_start, properties=props)
        self._client.loop_start()

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
        self._client.disconnect()
        self._client.loop_stop()
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
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as e:
            raise TransferError(f"publish to {topic} failed: {e}") from e
        if not info.is_published():
            raise TransferError(f"no PUBACK for {topic} within {timeout_s}s",
                                reason_code=Reason.TRANSFER_TIMEOUT)
        return self._acks.pop(info.mid, 0)

    # --- paho callbacks (paho's thread: hand over, never block) ----------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("MQTT connect refused: %s", reason_code)
            return
        logger.info("MQTT connected to %s:%s as %s", self._address.host, self._address.port,
                    self.settings.client_id)
        _set_nodelay(client.socket())  # issue 3: no Nagle delay on request/response
        self.backoff.reset()
        self._client.reconnect_delay_set(self.settings.reconnect_min_s,
                                         self.settings.reconnect_min_s)
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
        self._schedule_retry()

    def _handle_connect_fail(self, client, userdata) -> None:
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        delay_s = self.backoff.next_delay_s()
        self.reconnects += 1
        self._client.reconnect_delay_set(delay_s, delay_s)  # a lock and two floats
        logger.debug("MQTT reconnect in %.2fs", delay_s)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            logger.warning("broker refused %d subscription(s): %s", len(refused), refused)
        self._subscribed.set()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks[mid] = reason_code.value
        if len(self._acks) > 10_000:  # nobody collected these: bound the table
            self._acks.clear()

    def _handle_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
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


def _set_nodelay(sock) -> None:
    """Chunk request/response is stop-and-wait: without TCP_NODELAY each small request
    waits for the peer's delayed ACK (~40 ms on Linux), capping throughput."""
    import socket as _socket
    try:
        raw = getattr(sock, "_sock", sock)  # unwrap paho's websocket wrapper, if any
        raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as e:
        logger.debug("TCP_NODELAY not set: %s", e)
