"""``edgeship broker check URL``: probe a broker for the MQTT 5 features edgeship uses and
say in which mode edgeship will run on it (or why it cannot run at all).

Every probe uses real sessions (``edgeship.common.mqtt.MqttSession``) on topics under
``edgeship/v1/check/<random>/``, so a locked-down broker must let the identity used here
(a fleet or operator login) publish and subscribe there. With ``--also URL`` (another node
of the same cluster) every message crosses nodes: published on the first URL, received on
the other.
"""

from __future__ import annotations

import queue
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from edgeship.common.mqtt import (SUBACK_TIMEOUT, BrokerFeatures, Message, MqttSession,
                                 SessionSettings, TlsSettings)
from edgeship.agent.protocol import DEFAULT_CHUNK_BYTES, MAX_CONTROL_BYTES, TOPIC_ROOT

#: what the agent asks for (SessionSettings default); less is reported
AGENT_SESSION_EXPIRY_S = 24 * 3600


@dataclass(frozen=True)
class CheckSettings:
    url: str
    other_url: str | None = None  # another node of the same cluster
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsSettings | None = None
    timeout_s: float = 5.0


@dataclass
class Check:
    feature: str
    ok: bool | None  # None: not probed (an earlier failure made it moot)
    detail: str
    required: bool = False  # edgeship cannot run without it


@dataclass
class Report:
    url: str
    checks: list[Check]
    mode: list[str]
    fatal: list[str]

    @property
    def usable(self) -> bool:
        return not self.fatal

    def to_dict(self) -> dict:
        return {"url": self.url, "usable": self.usable, "fatal": self.fatal,
                "mode": self.mode, "checks": [asdict(c) for c in self.checks]}


class _Probe:
    """Sessions on the broker, each with its own inbox; all stopped at the end."""

    def __init__(self, s: CheckSettings) -> None:
        self.s = s
        self.token = secrets.token_hex(4)
        self.root = f"{TOPIC_ROOT}/check/{self.token}"
        self.sessions: list[MqttSession] = []

    def session(self, name: str, *, other_node: bool = False, persistent: bool = False,
                will: tuple[str, bytes, bool] | None = None,
                subscriptions: list[tuple[str, int]] = (),
                client_id: str | None = None) -> tuple[MqttSession, queue.Queue]:
        inbox: queue.Queue[Message] = queue.Queue()
        url = self.s.other_url if other_node and self.s.other_url else self.s.url
        sess = MqttSession(self.settings_for(url, client_id or
                                             f"edgeship-check-{self.token}-{name}",
                                             persistent=persistent, will=will),
                           on_message=inbox.put)
        self.sessions.append(sess)
        sess.start(subscriptions)
        ready = sess.wait_subscribed if subscriptions else sess.wait_connected
        ready(self.s.timeout_s)
        return sess, inbox

    def settings_for(self, url: str, client_id: str, *, persistent: bool = False,
                     will: tuple[str, bytes, bool] | None = None) -> SessionSettings:
        return SessionSettings(
            url=url, client_id=client_id, clean_start=not persistent,
            session_expiry_s=300 if persistent else 0, tls=self.s.tls, will=will,
            username=self.s.username, password=self.s.password, reconnect_min_s=0.5,
            reconnect_max_s=2.0, subscribe_timeout_s=self.s.timeout_s)

    def get(self, inbox: queue.Queue, topic: str | None = None) -> Message | None:
        deadline = time.monotonic() + self.s.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = inbox.get(timeout=left)
            except queue.Empty:
                return None
            if topic is None or msg.topic == topic:
                return msg
        return None

    def close(self) -> None:
        for sess in self.sessions:
            try:
                sess.stop()
            except Exception:  # noqa: BLE001 - best effort at the end of a probe
                pass


_LOGIN_HINT = " (wrong or missing user name/password: --mqtt-username, --mqtt-password-file)"
_V5_HINT = " (the broker does not speak MQTT 5)"
_CONNECT_HINTS = {0x86: _LOGIN_HINT, 0x87: _LOGIN_HINT, 0x01: _V5_HINT, 0x84: _V5_HINT}


def _connect(p: _Probe) -> tuple[MqttSession | None, Check]:
    inbox: queue.Queue[Message] = queue.Queue()
    sess = MqttSession(p.settings_for(p.s.url, f"edgeship-check-{p.token}-main"),
                       on_message=inbox.put)
    p.sessions.append(sess)
    sess.start()
    deadline = time.monotonic() + p.s.timeout_s
    while not sess.wait_connected(0.05) and sess.refused_code is None \
            and time.monotonic() < deadline:
        pass
    if sess.connected and sess.features is not None:
        return sess, Check("MQTT 5 connect", True, "accepted", required=True)
    if sess.refused_code is not None:
        hint = _CONNECT_HINTS.get(sess.refused_code, "")
        detail = f"refused with reason code {sess.refused_code:#04x}{hint}"
    else:
        detail = f"no CONNACK within {p.s.timeout_s:.0f}s (down, not MQTT 5, or TLS needed)"
    return None, Check("MQTT 5 connect", False, detail, required=True)


def _request_response(p: _Probe, main: MqttSession) -> list[Check]:
    req_filter, resp = f"{p.root}/req/+", f"{p.root}/resp"
    responder, req_inbox = p.session("responder", other_node=True,
                                     subscriptions=[(req_filter, 1)])
    _, resp_inbox = p.session("requester", subscriptions=[(resp, 1)])
    corr = secrets.token_bytes(16)
    props = {"t": "1 200 0 5", "edgeship": "check"}
    main.publish(f"{p.root}/req/dev", b"ping", response_topic=resp, correlation_data=corr,
                 user_properties=props)
    req = p.get(req_inbox)
    rr_ok = req is not None and req.response_topic == resp and req.correlation_data == corr
    props_ok = req is not None and req.user_properties == props
    if rr_ok:
        responder.publish(req.response_topic, b"pong", correlation_data=req.correlation_data,
                          user_properties=props)
        answer = p.get(resp_inbox)
        rr_ok = answer is not None and answer.correlation_data == corr
    rr = Check("request/response", rr_ok, "ResponseTopic and CorrelationData carried both "
               "ways" if rr_ok else "the request or its answer lost ResponseTopic/"
               "CorrelationData (or never arrived)", required=True)
    up = Check("user properties", props_ok, "carried intact" if props_ok else
               f"received {req.user_properties if req else 'nothing'}", required=True)
    return [rr, up]


def _payload(p: _Probe, main: MqttSession, features: BrokerFeatures) -> Check:
    topic = f"{p.root}/big"
    _, inbox = p.session("big", other_node=True, subscriptions=[(topic, 1)])
    limit = features.max_packet_bytes
    for size in (DEFAULT_CHUNK_BYTES + 1024, MAX_CONTROL_BYTES):
        main.publish(topic, secrets.token_bytes(size))
        got = p.get(inbox, topic)
        if got is not None and len(got.payload) == size:
            note = f"{size // 1024} KiB delivered" + (f" (broker limit {limit} bytes)"
                                                     if limit else "")
            if size < DEFAULT_CHUNK_BYTES:
                note += f"; set chunk_bytes below {limit or size} in the agents"
            return Check("payload size", True, note, required=True)
    return Check("payload size", False, f"even {MAX_CONTROL_BYTES // 1024} KiB did not arrive"
                 + (f" (broker limit {limit} bytes)" if limit else ""), required=True)


def _retained(p: _Probe, main: MqttSession) -> Check:
    topic = f"{p.root}/retained"
    rc = main.publish_acked(topic, b"kept", retain=True, timeout_s=p.s.timeout_s)
    where = "another node" if p.s.other_url else "a new connection"
    _, inbox = p.session("late", other_node=True, subscriptions=[(topic, 1)])
    got = p.get(inbox, topic)
    main.publish_acked(topic, b"", retain=True, timeout_s=p.s.timeout_s)  # clear it
    ok = rc < 0x80 and got is not None and got.payload == b"kept"
    return Check("retained across reconnect", ok, f"delivered to a late subscriber on {where}"
                 if ok else f"not delivered to a late subscriber on {where} (edgeship "
                 "re-sends state when a device comes online, so it does not rely on it)")


def _persistent(p: _Probe, main: MqttSession) -> list[Check]:
    topic, cid = f"{p.root}/queued", f"edgeship-check-{p.token}-persist"
    first, _ = p.session("persist", persistent=True, subscriptions=[(topic, 1)],
                         client_id=cid)
    granted = first.features.session_expiry_s if first.features else None
    first.stop()
    main.publish_acked(topic, b"while-away", timeout_s=p.s.timeout_s)
    again, inbox = p.session("persist2", other_node=True, persistent=True, client_id=cid)
    got = p.get(inbox, topic)
    present = bool(again.features and again.features.session_present)
    ok = got is not None and got.payload == b"while-away"
    again.stop()
    p.session("persist-clean", client_id=cid)[0].stop()  # clean start drops the session
    where = " on another node" if p.s.other_url else ""
    checks = [Check("persistent sessions", ok, f"queued message delivered after reconnecting"
                    f"{where} (session present: {present})" if ok else
                    f"message sent while away was not delivered after reconnecting{where}")]
    ask = AGENT_SESSION_EXPIRY_S
    if granted is None:
        checks.append(Check("session expiry", True, f"as asked (agents ask {ask} s)"))
    else:
        checks.append(Check("session expiry", granted >= ask, f"broker grants at most "
                            f"{granted} s (agents ask {ask} s); longer outages lose the "
                            "session, the fleet re-sends state on reconnect"))
    return checks


def _will(p: _Probe) -> Check:
    topic = f"{p.root}/will"
    _, inbox = p.session("will-watch", subscriptions=[(topic, 1)])
    dying, _ = p.session("will", other_node=True, will=(topic, b"gone", False))
    dying.abort()
    got = p.get(inbox, topic)
    ok = got is not None and got.payload == b"gone"
    return Check("last will (LWT)", ok, "published when the connection dropped" if ok else
                 "not published: the fleet will show dead devices online")


def _shared(p: _Probe, main: MqttSession, features: BrokerFeatures) -> Check:
    filt = f"$share/edgeship-check/{p.root}/shared/+"
    if not features.shared_subscriptions:  # what a fleet server would meet if it tried
        sess, _ = p.session("share-probe", subscriptions=[(filt, 1)])
        code = sess.granted.get(filt)
        answer = f"SUBACK {_code(code)}" if sess.connected else \
            f"DISCONNECT {_code(sess.last_disconnect_code)}"
        return Check("shared subscriptions", False, "CONNACK: SharedSubscriptionAvailable = "
                     f"0; a $share SUBSCRIBE got {answer}")
    members = [p.session(f"share-{i}", other_node=bool(i), subscriptions=[(filt, 1)])
               for i in range(2)]
    codes = {m.granted.get(filt) for m, _ in members}
    if any(c is None or c == SUBACK_TIMEOUT or c >= 0x80 for c in codes) or \
            any(not m.connected for m, _ in members):
        return Check("shared subscriptions", False, f"subscription refused "
                     f"(SUBACK {', '.join(_code(c) for c in codes)}) or session closed")
    n = 10
    for i in range(n):
        main.publish(f"{p.root}/shared/{i}", str(i).encode())
    seen: list[bytes] = []
    deadline = time.monotonic() + p.s.timeout_s
    while len(seen) < n and time.monotonic() < deadline:
        for _, inbox in members:
            while not inbox.empty():
                seen.append(inbox.get().payload)
        time.sleep(0.05)
    time.sleep(0.3)  # a duplicate would arrive now
    for _, inbox in members:
        while not inbox.empty():
            seen.append(inbox.get().payload)
    ok = sorted(seen) == sorted(str(i).encode() for i in range(n))
    return Check("shared subscriptions", ok, f"{n} messages, each delivered once" if ok else
                 f"{len(seen)} deliveries for {n} messages ({len(set(seen))} distinct)")


def _code(code: int | None) -> str:
    return "none" if code is None or code == SUBACK_TIMEOUT else f"{code:#04x}"


def _mode(checks: list[Check]) -> tuple[list[str], list[str]]:
    by = {c.feature: c for c in checks}
    fatal = [f"{c.feature}: {c.detail}" for c in checks if c.required and c.ok is False]
    if fatal:
        return [], fatal
    shared = by.get("shared subscriptions")
    mode = ["transfers: " + ("shared subscription $share/edgeship-fleet/… — run any number "
                             "of fleet servers" if shared and shared.ok else
                             "split by device between the fleet servers sharing one registry "
                             "(no shared subscriptions); or --transfers off with HTTP devices")]
    retained = by.get("retained across reconnect")
    mode.append("device catch-up: desired state and announcements re-sent when a device "
                "comes online" + ("" if retained and retained.ok else
                                  " (needed here: retained messages are not reliable)"))
    will = by.get("last will (LWT)")
    if will and will.ok is False:
        mode.append("presence: devices that die are not marked offline (no will delivered)")
    return mode, fatal


_PROBES: list[Callable[[_Probe, MqttSession, BrokerFeatures], list[Check] | Check]] = [
    lambda p, m, f: _request_response(p, m),
    lambda p, m, f: _payload(p, m, f),
    lambda p, m, f: _retained(p, m),
    lambda p, m, f: _persistent(p, m),
    lambda p, m, f: _will(p),
    lambda p, m, f: _shared(p, m, f),
]


def check_broker(settings: CheckSettings) -> Report:
    probe = _Probe(settings)
    try:
        main, connect = _connect(probe)
        checks = [connect]
        if main is not None:
            features = main.features
            for run in _PROBES:
                result = run(probe, main, features)
                checks += result if isinstance(result, list) else [result]
                if not main.connected:  # e.g. a broker that disconnects on $share
                    main, _ = probe.session(f"main{len(checks)}")
    finally:
        probe.close()
    mode, fatal = _mode(checks)
    return Report(settings.url, checks, mode, fatal)
