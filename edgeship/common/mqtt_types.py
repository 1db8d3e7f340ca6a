"""The MQTT session's plain values, with no paho in them: its settings, the broker's address,
an inbound message, what the broker's CONNACK said, and the reconnect backoff.

:mod:`edgeship.common.mqtt` (the session, the paho importer) re-exports every name here;
code that only needs these values (the agent's config, the update worker) imports them
from here without loading paho.
"""

from __future__ import annotations

import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

from edgeship.agent.errors import ConfigError

#: Reconnect backoff bounds: the one definition (the agent's config defaults to these too).
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 60.0


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
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # read from a file, never argv
    subscribe_timeout_s: float = 10.0  # a SUBACK later than this is logged as an error
    stable_after_s: float = 10.0  # a connection this old resets the reconnect backoff


@dataclass(frozen=True)
class BrokerFeatures:
    """What the broker's CONNACK said (MQTT 5 properties; absent = the spec's default)."""

    shared_subscriptions: bool = True
    retain_available: bool = True
    wildcard_subscriptions: bool = True
    max_packet_bytes: int | None = None  # None: no limit announced
    session_expiry_s: int | None = None  # what the broker granted, when it changed ours
    receive_maximum: int | None = None
    server_keepalive_s: int | None = None
    session_present: bool = False

    @classmethod
    def from_connack(cls, flags: object, properties: object | None) -> "BrokerFeatures":
        def prop(name: str, default: int | None = None) -> Any:
            return getattr(properties, name, default) if properties is not None else default
        return cls(shared_subscriptions=bool(prop("SharedSubscriptionAvailable", 1)),
                   retain_available=bool(prop("RetainAvailable", 1)),
                   wildcard_subscriptions=bool(prop("WildcardSubscriptionAvailable", 1)),
                   max_packet_bytes=prop("MaximumPacketSize"),
                   session_expiry_s=prop("SessionExpiryInterval"),
                   receive_maximum=prop("ReceiveMaximum"),
                   server_keepalive_s=prop("ServerKeepAlive"),
                   session_present=bool(getattr(flags, "session_present", False)))


#: a subscription: (filter, qos); or a function of the CONNACK's features that returns them
Subscriptions = Union[Iterable[tuple[str, int]],
                      Callable[[BrokerFeatures], Iterable[tuple[str, int]]]]
SUBACK_TIMEOUT = -1  # the code on_subscribe_result gets when no SUBACK arrived in time


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
