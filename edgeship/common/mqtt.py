"""The MQTT 5 session (callback API version 2); with ``mqtt_loop``, the only paho importer.

paho's callbacks run on paho's network thread. They never block and never take an
application lock: they hand each message to the owner's ``on_message`` (which must be
just as quick, e.g. ``queue.put_nowait``) and hand PUBACK reason codes to the waiter
registered for that message id (a lock held only for a dict operation guards the table).
Subscriptions are re-made on every (re)connect, one SUBSCRIBE per filter.

By default each session runs paho's own network thread; a
:class:`~edgeship.common.mqtt_loop.SharedLoop` drives many sessions from one thread. The
plain values (settings, message, broker features, backoff) live in
:mod:`edgeship.common.mqtt_types` and are re-exported here.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeship.agent.errors import ConfigError, Reason, TransferError
from edgeship.common.mqtt_types import (RECONNECT_MAX_S, RECONNECT_MIN_S, SUBACK_TIMEOUT,
                                        Backoff, BrokerAddress, BrokerFeatures, Message,
                                        SessionSettings, Subscriptions, TlsSettings)

if TYPE_CHECKING:
    from edgeship.common.mqtt_loop import SharedLoop

logger = logging.getLogger(__name__)

#: PUBACKs that arrived before ``publish_acked`` registered its waiter (a fast broker), kept
#: for it; far fewer than the 65,535 message ids, so an entry never outlives its id's reuse.
MAX_EARLY_ACKS = 1024


class MqttSession:
    """A persistent MQTT 5 session that (re)subscribes on every connect, one SUBSCRIBE per
    filter: a broker that refuses one filter (or never answers a multi-filter SUBSCRIBE)
    costs that filter only, and each refusal or missing SUBACK is logged with its filter.

    ``on_connect`` runs once this connection's subscriptions are settled (every SUBACK in,
    or ``subscribe_timeout_s`` passed). ``on_subscribe_result(filter, code)`` gets each
    SUBACK's reason code (``SUBACK_TIMEOUT`` when none came). ``features`` holds what the
    last CONNACK said (shared subscriptions, packet size, granted session expiry ...)."""

    def __init__(self, settings: SessionSettings,
                 on_message: Callable[[Message], None],
                 on_connect: Callable[[], None] | None = None,
                 loop: "SharedLoop | None" = None,
                 on_subscribe_result: Callable[[str, int], None] | None = None) -> None:
        self.settings = settings
        self._loop = loop  # None: paho's own network thread
        self._address = BrokerAddress.parse(settings.url)
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._on_suback_cb = on_subscribe_result
        self._subscriptions: Subscriptions = ()
        self._added: list[tuple[str, int]] = []  # subscribe() after start()
        self._sub_lock = threading.Lock()  # guards _pending: SUBSCRIBE may come from any thread
        self._pending: dict[int, tuple[str, int]] = {}  # mid -> (filter, connection number)
        self._generation = 0  # connection number
        self.granted: dict[str, int] = {}  # filter -> last SUBACK reason code
        self.features: BrokerFeatures | None = None
        self.last_disconnect_code: int | None = None
        self.refused_code: int | None = None  # reason code of the last refused CONNECT
        self._connected_at: float | None = None
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
        if s.username is not None or s.password is not None:
            client.username_pw_set(s.username or "", s.password)
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

    def start(self, subscriptions: Subscriptions = ()) -> None:
        """``subscriptions``: (filter, qos) pairs, or a function of the CONNACK's
        :class:`BrokerFeatures` returning them (called on every connect)."""
        self._subscriptions = subscriptions if callable(subscriptions) else list(subscriptions)
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

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Add a subscription (kept for every later connect); sent now when connected."""
        if all(f != topic_filter for f, _ in self._added):
            self._added.append((topic_filter, qos))
        if self.connected:
            self._send_subscribe(self._client, topic_filter, qos, self._generation)

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

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT packet, as a crash or a cut cable
        would (the broker then publishes the will); no reconnect follows."""
        self._stopping = True
        raw = _raw_socket(self._client.socket())
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError as e:
                logger.debug("abort: %s", e)
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
            hint = " (check the MQTT user name and password)" \
                if reason_code.value in (0x86, 0x87) else ""
            self.refused_code = reason_code.value
            self.last_error = f"connect refused: {reason_code} ({reason_code.value:#04x}){hint}"
            logger.warning("MQTT connect to %s refused: %s (reason code %#04x)%s",
                           self.settings.url, reason_code, reason_code.value, hint)
            return
        self.refused_code = None
        self.features = BrokerFeatures.from_connack(flags, properties)
        self._connected_at = time.monotonic()
        self.last_contact, self.next_retry_at, self.last_error = time.time(), None, None
        logger.info("MQTT connected to %s:%s as %s", self._address.host, self._address.port,
                    self.settings.client_id)
        _set_nodelay(client.socket())  # issue 3: no Nagle delay on request/response
        # the backoff is reset only once the connection proved stable (_handle_disconnect):
        # a broker that accepts and then drops us at once must not be hammered
        _set_delay(self._client, self.settings.reconnect_min_s)
        self._subscribed.clear()
        with self._sub_lock:
            self._generation += 1
            self._pending.clear()
        wanted = self._wanted_subscriptions(self.features)
        self._connected.set()
        if not wanted:
            self._settled()
            return
        for topic_filter, qos in wanted:
            self._send_subscribe(client, topic_filter, qos, self._generation)
        self._after(self.settings.subscribe_timeout_s,
                    functools.partial(self._check_subacks, self._generation))

    def _wanted_subscriptions(self, features: BrokerFeatures) -> list[tuple[str, int]]:
        spec = self._subscriptions
        subs = list(spec(features) if callable(spec) else spec) + self._added
        seen: dict[str, int] = {}
        for topic_filter, qos in subs:
            seen.setdefault(topic_filter, qos)
        return list(seen.items())

    def _send_subscribe(self, client: paho.Client, topic_filter: str, qos: int,
                        generation: int) -> None:
        with self._sub_lock:
            rc, mid = client.subscribe([(topic_filter, SubscribeOptions(qos=qos))])
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._pending[mid] = (topic_filter, generation)
        if rc != paho.MQTT_ERR_SUCCESS:
            logger.warning("SUBSCRIBE %s not sent (rc=%s)", topic_filter, rc)

    def _after(self, delay_s: float, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.call_later(delay_s, fn)
        else:
            timer = threading.Timer(delay_s, fn)
            timer.daemon = True
            timer.start()

    def _check_subacks(self, generation: int) -> None:
        """``subscribe_timeout_s`` after a connect: every SUBACK still missing is an error
        (some brokers drop a SUBSCRIBE silently); the session goes on without it."""
        with self._sub_lock:
            if generation != self._generation or self._stopping or not self.connected:
                return  # that connection is gone (its loss was logged) or we stopped
            missing = [f for f, g in self._pending.values() if g == generation]
            self._pending.clear()
        for topic_filter in missing:
            logger.error("no SUBACK from %s for %s within %.0fs: this subscription is not "
                         "active", self.settings.url, topic_filter,
                         self.settings.subscribe_timeout_s)
            self.granted[topic_filter] = SUBACK_TIMEOUT
            if self._on_suback_cb is not None:
                self._on_suback_cb(topic_filter, SUBACK_TIMEOUT)
        if missing and self.connected:
            self._settled()

    def _settled(self) -> None:
        """Every subscription of this connection is answered (or timed out)."""
        if self._subscribed.is_set():
            return
        self._subscribed.set()
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        code = getattr(reason_code, "value", None)
        self.last_disconnect_code = code
        if self._stopping:
            logger.info("MQTT disconnected from %s", self.settings.url)
            return
        up_s = time.monotonic() - self._connected_at if self._connected_at else 0.0
        self._connected_at = None
        if up_s >= self.settings.stable_after_s:
            self.backoff.reset()
        shown = f"{code:#04x}" if isinstance(code, int) else code
        self._schedule_retry(f"connection lost after {up_s:.1f}s: {reason_code} "
                             f"(reason code {shown})")

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
        with self._sub_lock:
            entry = self._pending.pop(mid, None)
            done = entry is not None and not any(g == entry[1]
                                                 for _, g in self._pending.values())
        if entry is None:
            return  # a SUBACK after its timeout (already reported) or for an old connection
        topic_filter = entry[0]
        code = reason_codes[0].value if reason_codes else SUBACK_TIMEOUT
        self.granted[topic_filter] = code
        if code >= 0x80:
            logger.warning("broker %s refused the subscription %s: %s (reason code %#04x)",
                           self.settings.url, topic_filter, reason_codes[0], code)
        if self._on_suback_cb is not None:
            self._on_suback_cb(topic_filter, code)
        if done:
            self._settled()

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


def _set_nodelay(sock: object) -> None:
    """Chunk request/response is stop-and-wait: without TCP_NODELAY each small request
    waits for the peer's delayed ACK (~40 ms on Linux), capping throughput."""
    raw = _raw_socket(sock)
    try:
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        logger.debug("TCP_NODELAY not set: %s", e)


def _raw_socket(sock: object) -> socket.socket | None:
    """paho's socket, unwrapped from its websocket wrapper, if any."""
    raw = getattr(sock, "_sock", sock)
    return raw if isinstance(raw, socket.socket) else None


__all__ = ["MAX_EARLY_ACKS", "RECONNECT_MAX_S", "RECONNECT_MIN_S", "SUBACK_TIMEOUT", "Backoff",
           "BrokerAddress", "BrokerFeatures", "Message", "MqttSession", "SessionSettings",
           "Subscriptions", "TlsSettings"]
