"""The wire contract between host and device, in one place (see docs/protocol.md).

Topic names, message schemas and their validation. Pure functions: no I/O, no paho.
Every JSON message carries ``"schema": SCHEMA_VERSION``; a device rejects any other
version with reason ``unsupported_schema``. Sizes are checked before parsing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from edgeship.agent.errors import ProtocolError, Reason
from edgeship.common.compat import StrEnum

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgeship/v1"
SHARED_GROUP = "edgeship-fleet"

#: Control messages (JSON) larger than this are rejected before parsing.
MAX_CONTROL_BYTES = 64 * 1024
#: Largest chunk a fleet server sends in one transfer response.
MAX_CHUNK_BYTES = 1024 * 1024
#: Default chunk: big enough that per-chunk work (paho's Python packet handling on both
#: ends) is small next to the bytes, small enough for brokers' default packet limits
#: (EMQX: 1 MB) and for resumes (a broker outage re-sends at most one chunk).
DEFAULT_CHUNK_BYTES = 512 * 1024

QOS_AT_LEAST_ONCE = 1
#: Integers on the wire (versions, seqs, offsets, counters) fit a signed 64-bit field, as
#: in every store they land in (SQLite INTEGER, PostgreSQL BIGINT, the agent's records).
INT64_MAX = 2**63 - 1

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_id(value: str, what: str = "device id") -> str:
    """Device ids and model names are used inside topics and paths: keep them tame."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"invalid {what} {value!r}: use 1-64 of [A-Za-z0-9_.-]",
                            reason_code=Reason.MALFORMED_MESSAGE)
    return value


# --- topics ------------------------------------------------------------------------------

class Topics:
    """Topic names. Per device: presence (retained), status, telemetry, desired (retained),
    transfer responses. Fleet-wide: release announcements (retained, one per model) and
    transfer requests (served through a shared subscription)."""

    @staticmethod
    def presence(device: str) -> str:
        return f"{TOPIC_ROOT}/dev/{device}/presence"

    @staticmethod
    def status(device: str) -> str:
        return f"{TOPIC_ROOT}/dev/{device}/status"

    @staticmethod
    def telemetry(device: str) -> str:
        return f"{TOPIC_ROOT}/dev/{device}/telemetry"

    @staticmethod
    def desired(device: str) -> str:
        return f"{TOPIC_ROOT}/dev/{device}/desired"

    @staticmethod
    def transfer_response(device: str) -> str:
        return f"{TOPIC_ROOT}/dev/{device}/transfer/resp"

    @staticmethod
    def transfer_request(device: str) -> str:
        return f"{TOPIC_ROOT}/transfer/req/{device}"

    @staticmethod
    def release(model: str) -> str:
        return f"{TOPIC_ROOT}/fleet/releases/{model}"

    @staticmethod
    def device_release(device: str, model: str) -> str:
        """An announcement re-sent to one device (not retained) when it comes online."""
        return f"{TOPIC_ROOT}/dev/{device}/releases/{model}"

    @staticmethod
    def device_releases_filter(device: str) -> str:
        return f"{TOPIC_ROOT}/dev/{device}/releases/+"

    # subscription filters
    RELEASES_FILTER = f"{TOPIC_ROOT}/fleet/releases/+"
    TRANSFER_REQUESTS = f"{TOPIC_ROOT}/transfer/req/+"
    TRANSFER_REQUESTS_SHARED = f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/transfer/req/+"
    DEVICE_PRESENCE_FILTER = f"{TOPIC_ROOT}/dev/+/presence"
    DEVICE_STATUS_FILTER = f"{TOPIC_ROOT}/dev/+/status"
    DEVICE_TELEMETRY_FILTER = f"{TOPIC_ROOT}/dev/+/telemetry"


@dataclass(frozen=True)
class ParsedTopic:
    kind: str  # presence|status|telemetry|desired|transfer_resp|transfer_req|release
    device: str | None = None
    model: str | None = None


def parse_topic(topic: str) -> ParsedTopic:
    """Map a concrete topic back to what it is; raise ProtocolError for anything else."""
    parts = topic.split("/")
    if len(parts) < 3 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise ProtocolError(f"topic outside {TOPIC_ROOT}: {topic!r}")
    rest = parts[2:]
    if len(rest) == 3 and rest[0] == "dev" and rest[2] in ("presence", "status", "telemetry",
                                                            "desired"):
        return ParsedTopic(rest[2], device=validate_id(rest[1]))
    if len(rest) == 4 and rest[0] == "dev" and rest[2:] == ["transfer", "resp"]:
        return ParsedTopic("transfer_resp", device=validate_id(rest[1]))
    if len(rest) == 4 and rest[0] == "dev" and rest[2] == "releases":
        return ParsedTopic("release", device=validate_id(rest[1]),
                           model=validate_id(rest[3], "model name"))
    if len(rest) == 3 and rest[:2] == ["transfer", "req"]:
        return ParsedTopic("transfer_req", device=validate_id(rest[2]))
    if len(rest) == 3 and rest[:2] == ["fleet", "releases"]:
        return ParsedTopic("release", model=validate_id(rest[2], "model name"))
    raise ProtocolError(f"unknown topic {topic!r}")


# --- JSON messages -----------------------------------------------------------------------

def encode(kind: str, body: dict[str, Any]) -> bytes:
    """Serialise a message, adding schema version and kind."""
    msg = {"schema": SCHEMA_VERSION, "kind": kind, **body}
    return json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()


def _json_int(text: str) -> int:
    if len(text) > 20:  # before int(): a 5,000-digit literal costs, then raises
        raise ValueError(f"integer literal of {len(text)} digits")
    value = int(text)
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ValueError(f"integer {value} outside the signed 64-bit range")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is not finite")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | str) -> Any:
    """Strict JSON for anything that comes from outside: integers within the signed 64-bit
    range, finite numbers only (no NaN/Infinity), nesting bounded by the interpreter's
    recursion limit. Every failure is a :class:`ProtocolError` (``malformed_message``)."""
    try:
        return json.loads(data, parse_int=_json_int, parse_float=_json_float,
                          parse_constant=_json_constant)
    except RecursionError as e:
        raise ProtocolError("JSON nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the hooks' errors
        raise ProtocolError(f"not JSON: {str(e)[:200]}") from e


def decode(payload: bytes, *, expect_kind: str | None = None,
           max_bytes: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """Parse a JSON control message: size first, then JSON, then schema and kind."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {max_bytes}",
                            reason_code=Reason.PAYLOAD_TOO_LARGE)
    msg = loads(payload)
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    schema = msg.get("schema")
    if schema != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {schema!r} (speak {SCHEMA_VERSION})",
                            reason_code=Reason.UNSUPPORTED_SCHEMA)
    if expect_kind is not None and msg.get("kind") != expect_kind:
        raise ProtocolError(f"expected a {expect_kind!r} message, got {msg.get('kind')!r}")
    return msg


def _require(msg: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    value = msg.get(key)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ProtocolError(f"field {key!r} missing or not {getattr(typ, '__name__', typ)}")
    return value


@dataclass(frozen=True)
class ReleaseAnnouncement:
    """Fleet → devices, retained per model: 'version N of model M is available'. A hint
    only: the device trusts nothing in it until TUF metadata confirms it.

    ``spread_s`` (optional, absent = 0): devices start fetching at a deterministic
    per-device offset in ``[0, spread_s)`` after ``released_at`` (see
    :func:`spread_delay_s`), so a fleet does not hit the fleet servers in one instant."""

    model: str
    version: int
    released_at: float
    spread_s: float = 0.0
    KIND = "release"

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"model": self.model, "version": self.version,
                                "released_at": self.released_at}
        if self.spread_s > 0:
            body["spread_s"] = self.spread_s
        return encode(self.KIND, body)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "ReleaseAnnouncement":
        msg = decode(payload, expect_kind=cls.KIND)
        version = _require(msg, "version", int)
        if version < 1:
            raise ProtocolError("field 'version' must be >= 1")
        spread_s = msg.get("spread_s", 0)
        if isinstance(spread_s, bool) or not isinstance(spread_s, (int, float)) \
                or not 0 <= spread_s <= MAX_SPREAD_S:
            raise ProtocolError(f"field 'spread_s' must be a number in [0, {MAX_SPREAD_S}]")
        return cls(model=validate_id(_require(msg, "model", str), "model name"),
                   version=version, released_at=float(_require(msg, "released_at",
                                                               (int, float))),
                   spread_s=float(spread_s))


#: Longest announcement spread a device accepts (a day).
MAX_SPREAD_S = 86_400.0


def spread_delay_s(device: str, model: str, version: int, spread_s: float,
                   released_at: float, now: float) -> float:
    """How long a device waits before fetching an announced release: its own offset in
    ``[0, spread_s)`` (from a hash of device, model and version, so it is the same after a
    restart and differs per release), counted from ``released_at``. A device that hears of
    the release late (was offline) starts at once; a device whose clock is behind never
    waits longer than its offset."""
    if spread_s <= 0:
        return 0.0
    digest = hashlib.sha256(f"{device}/{model}/{version}".encode()).digest()
    offset_s = int.from_bytes(digest[:8], "big") / 2 ** 64 * min(spread_s, MAX_SPREAD_S)
    return max(0.0, min(offset_s, released_at + offset_s - now))


#: Signed desired states are signed over this prefix + the message (``sig`` left out,
#: ``device`` added), so the signature can never pass for TUF metadata or another device's.
DESIRED_SIGNING_CONTEXT = b"edgeship-desired-state-v1\n"


@dataclass(frozen=True)
class DesiredState:
    """Fleet → one device, retained on ``Topics.desired(device)``: 'run version N of model
    M'. Ordered by ``(epoch, seq)``: ``seq`` grows with every change a registry makes and
    ``epoch`` names the registry (its creation time in milliseconds; absent = 0), so a
    recreated registry, whose ``seq`` starts again at 1, still outranks the old one. A
    device acts only on an ``(epoch, seq)`` newer than the last one it accepted, so a
    redelivered or out-of-order command never moves it off the newest desired version.
    Like an announcement it is a hint: TUF still decides what may be installed. Once a
    device has a desired state for a model it ignores fleet-wide announcements for that
    model (the rollout decides).

    ``sig`` (``(keyid, hex signature)``): a fleet server holding the repository's online
    timestamp key signs every desired state with it (:meth:`signing_bytes`); devices check
    it against the timestamp keys of their trusted TUF root, and once they accepted a signed
    one they refuse unsigned ones — so nobody else on the broker can feed a device an order
    (a huge ``seq`` or ``epoch``) that would make it ignore the fleet.

    ``hold`` (all-or-none rollouts): download, verify and health-check the version, report
    ``held``, but do not switch; a later command with a larger ``seq`` and no ``hold``
    commits (switch) or names the old version (discard)."""

    model: str
    version: int
    seq: int
    rollout: str | None = None
    hold: bool = False
    epoch: int = 0
    sig: tuple[str, str] | None = None
    KIND = "desired"

    @property
    def order(self) -> tuple[int, int]:
        return self.epoch, self.seq

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "version": self.version, "seq": self.seq}
        if self.rollout is not None:
            body["rollout"] = self.rollout
        if self.hold:
            body["hold"] = True
        if self.epoch:
            body["epoch"] = self.epoch
        return body

    def signing_bytes(self, device: str) -> bytes:
        """What the fleet signs: the message without ``sig``, for one device."""
        return DESIRED_SIGNING_CONTEXT + encode(self.KIND, {**self._body(), "device": device})

    def to_bytes(self) -> bytes:
        body = self._body()
        if self.sig is not None:
            body["sig"] = {"keyid": self.sig[0], "sig": self.sig[1]}
        return encode(self.KIND, body)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "DesiredState":
        msg = decode(payload, expect_kind=cls.KIND)
        version, seq = _require(msg, "version", int), _require(msg, "seq", int)
        epoch = msg.get("epoch", 0)
        if version < 1 or seq < 1 or not isinstance(epoch, int) or isinstance(epoch, bool) \
                or epoch < 0:
            raise ProtocolError("fields 'version' and 'seq' must be >= 1, 'epoch' >= 0")
        rollout = msg.get("rollout")
        if rollout is not None and not isinstance(rollout, str):
            raise ProtocolError("field 'rollout' must be a string")
        if not isinstance(msg.get("hold", False), bool):
            raise ProtocolError("field 'hold' must be a boolean")
        return cls(model=validate_id(_require(msg, "model", str), "model name"),
                   version=version, seq=seq, rollout=rollout, hold=msg.get("hold", False),
                   epoch=epoch, sig=_signature(msg.get("sig")))


_HEX_RE = re.compile(r"^[0-9a-f]{1,1024}$")


def _signature(raw: Any) -> tuple[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(
            isinstance(raw.get(k), str) and _HEX_RE.match(raw[k]) for k in ("keyid", "sig")):
        raise ProtocolError("field 'sig' must be {'keyid': hex, 'sig': hex}")
    return raw["keyid"], raw["sig"]


@dataclass(frozen=True)
class TransferRequest:
    """Device → fleet: 'send me bytes [offset, offset+length) of repository file path'.
    Sent with MQTT 5 ResponseTopic and CorrelationData; the answer is a raw-bytes payload
    with user properties (see TRANSFER_* below)."""

    path: str
    offset: int
    length: int
    compact: bool = False  # answer with TRANSFER_COMPACT; absent = false (older devices)
    KIND = "transfer_request"

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"path": self.path, "offset": self.offset,
                                "length": self.length}
        if self.compact:
            body["compact"] = True
        return encode(self.KIND, body)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "TransferRequest":
        msg = decode(payload, expect_kind=cls.KIND)
        path = _require(msg, "path", str)
        offset = _require(msg, "offset", int)
        length = _require(msg, "length", int)
        if offset < 0 or not 0 < length <= MAX_CHUNK_BYTES:
            raise ProtocolError(f"bad range offset={offset} length={length}")
        compact = msg.get("compact", False)
        if not isinstance(compact, bool):
            raise ProtocolError("field 'compact' must be a boolean")
        return cls(path=safe_repo_path(path), offset=offset, length=length, compact=compact)


#: User properties on a transfer response (strings, as MQTT 5 requires).
TRANSFER_STATUS = "status"      # "200", "400", "404", "416", "500"
TRANSFER_OFFSET = "offset"
TRANSFER_TOTAL = "total"        # full length of the file
TRANSFER_ERROR = "error"
TRANSFER_SCHEMA = "schema"
#: The compact form, for requests with ``"compact": true``: one user property
#: ``"t" = "{schema} {status} {offset} {total}"`` instead of four (paho decodes every
#: property in Python, a large share of a device's CPU per chunk); ``error`` stays apart.
TRANSFER_COMPACT = "t"


def transfer_props(status: int, offset: int, total: int, error: str | None = None, *,
                   compact: bool = False) -> dict[str, str]:
    """User properties of a transfer response, in the long or the compact form."""
    if compact:
        props = {TRANSFER_COMPACT: f"{SCHEMA_VERSION} {status} {offset} {total}"}
    else:
        props = {TRANSFER_SCHEMA: str(SCHEMA_VERSION), TRANSFER_STATUS: str(status),
                 TRANSFER_OFFSET: str(offset), TRANSFER_TOTAL: str(total)}
    if error:
        props[TRANSFER_ERROR] = error[:256]
    return props


def safe_repo_path(path: str) -> str:
    """Repository paths are relative, '/'-separated, under metadata/ or targets/, no '..'."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\x00" in path
            or any(p in ("", ".", "..") for p in parts)
            or parts[0] not in ("metadata", "targets") or len(path) > 512):
        raise ProtocolError(f"bad repository path {path!r}")
    return path


class StatusEvent(StrEnum):
    """The ``event`` of a device's status message. Never rename one: the fleet and devices
    already in the field match these strings."""

    # one update, in order (see docs/safe-install.md)
    RECOVERING = "recovering"  # the agent restarted mid-update (from_state, restarts)
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    HEALTH_CHECK = "health_check"
    SHADOW = "shadow"
    SHADOW_RESULT = "shadow_result"  # the shadow run's summary (the fleet's shadow gate)
    TRIAL = "trial"
    SERVING = "serving"  # a version serves (also after a revert: reverted_from/reverted)
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"  # reason, detail
    # all-or-none rollouts
    HELD = "held"  # staged, checked and warm; waiting for the commit
    DISCARDED = "discarded"  # a held copy was dropped (the rollout rolled back)
    # not acted on
    REJECTED = "rejected"  # a message or an announced version refused (reason)
    METADATA_STALE = "metadata_stale"  # the repository's signed metadata expired
    DELTA_REJECTED = "delta_rejected"  # a delta did not rebuild the file: full download


def status_event(device: str, event: StatusEvent, *, model: str | None = None,
                 version: int | None = None, reason: str | None = None,
                 detail: str | None = None, **extra: Any) -> bytes:
    """Device → fleet status event (QoS 1, not retained): a lifecycle step or a rejection."""
    body: dict[str, Any] = {"device": device, "event": str(event), **extra}
    for key, value in (("model", model), ("version", version), ("reason", reason),
                       ("detail", detail)):
        if value is not None:
            body[key] = value
    return encode("status", body)
