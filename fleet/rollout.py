"""Rollout policy, pure: waves, gates, decisions and the rollout state machine.

No I/O here. The policy itself (waves, gates, settings) is :mod:`fleet.rollout_policy`,
re-exported here. :mod:`fleet.rollout_runner` feeds observations from the registry in and carries
decisions out (desired state, kill switch, audit log). Everything is plain data that round-
trips through JSON, so a rollout survives a fleet-server restart.

A wave passes when its devices installed the new version (install success rate), then
served traffic on it for ``soak_s`` with an acceptable error rate, a p50 latency no worse
than ``max_latency_ratio`` times what *the same devices* measured on the previous version,
and — where the release asks for shadow testing — enough agreement with the old model.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Mapping

from edgeship.agent.errors import TransitionError  # bad input: exit 2
from edgeship.agent.protocol import StatusEvent
from edgeship.fleet.quality_gates import QualityObservation
from edgeship.fleet.quality_gates import check as quality_check
from edgeship.fleet.quality_gates import check_drift as quality_drift
from edgeship.fleet.rollout_policy import OFFLINE_POLICIES, Gates, Policy, parse_waves


class State(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"          # by a person; resume continues
    HALTED = "halted"          # a gate failed and the policy says pause; resume continues
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    DONE = "done"


class Event(str, Enum):
    WAVE_PASSED = "wave_passed"
    LAST_WAVE_PASSED = "last_wave_passed"
    GATE_FAILED_PAUSE = "gate_failed_pause"
    GATE_FAILED_ROLLBACK = "gate_failed_rollback"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    ROLLBACK_DONE = "rollback_done"


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.RUNNING, E.WAVE_PASSED): S.RUNNING,
    (S.RUNNING, E.LAST_WAVE_PASSED): S.DONE,
    (S.RUNNING, E.GATE_FAILED_PAUSE): S.HALTED,
    (S.RUNNING, E.GATE_FAILED_ROLLBACK): S.ROLLING_BACK,
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.RESUME): S.RUNNING,
    (S.HALTED, E.RESUME): S.RUNNING,
    (S.RUNNING, E.ABORT): S.ABORTED,
    (S.PAUSED, E.ABORT): S.ABORTED,
    (S.HALTED, E.ABORT): S.ABORTED,
    (S.RUNNING, E.ROLLBACK): S.ROLLING_BACK,
    (S.PAUSED, E.ROLLBACK): S.ROLLING_BACK,
    (S.HALTED, E.ROLLBACK): S.ROLLING_BACK,
    (S.ABORTED, E.ROLLBACK): S.ROLLING_BACK,
    (S.DONE, E.ROLLBACK): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLBACK_DONE): S.ROLLED_BACK,
}
ACTIVE = (S.RUNNING, S.ROLLING_BACK)
FINAL = (S.ROLLED_BACK, S.ABORTED, S.DONE)


def transition(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"cannot {event.value} a rollout that is {state.value}") from None


def version_text(version: int | None) -> str:
    """``v3``; a rollout from devices that run nothing yet says so (never ``vNone``)."""
    return "nothing installed" if version is None else f"v{version}"


# --- waves ----------------------------------------------------------------------------------

def _rank(seed: str, device: str) -> str:
    return hashlib.sha256(f"{seed}/{device}".encode()).hexdigest()


def plan_waves(devices: list[str], fractions: tuple[float, ...],
               seed: str) -> list[list[str]]:
    """Split devices into waves of cumulative ``fractions`` (each wave at least one device),
    in a stable pseudo-random order so a rollout always picks the same canaries."""
    order = sorted(devices, key=lambda d: _rank(seed, d))
    waves, taken = [], 0
    for f in fractions:
        upto = min(len(order), max(taken + 1, math.ceil(f * len(order))))
        if upto > taken:
            waves.append(order[taken:upto])
            taken = upto
    return waves


def jitter_offset_s(seed: str, device: str, jitter_s: float) -> float:
    """Deterministic per-device delay in [0, jitter_s) for spreading announcements."""
    return int(_rank(seed, device)[:8], 16) / 0x1_0000_0000 * jitter_s


# --- gates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceStats:
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    agreement: float | None = None


@dataclass(frozen=True)
class ShadowResult:
    """One device's shadow run of the new version, as the agent reported it: the ``shadow``
    field of its ``shadow_result`` status event (``agent.shadow.ShadowRun.summary``)."""

    agreement: float | None          # top-1 agreement with the served version
    compared: int = 0                # samples compared
    samples: int = 0                 # samples the release asked for
    min_agreement: float | None = None  # the release's own threshold (signed manifest)

    @classmethod
    def from_report(cls, doc: Mapping[str, Any]) -> "ShadowResult":
        def num(v: Any) -> float | None:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            return float(v) if ok else None
        count = {k: int(doc[k]) if isinstance(doc.get(k), int) else 0
                 for k in ("compared", "samples")}
        return cls(num(doc.get("agreement")), min_agreement=num(doc.get("min_agreement")),
                   **count)


@dataclass(frozen=True)
class WaveObservation:
    devices: tuple[str, ...]
    started_at: float
    outcomes: Mapping[str, tuple[str, str | None]]   # device -> (SERVING|FAILED, reason)
    new_stats: Mapping[str, DeviceStats]             # new version, since the wave started
    baseline: Mapping[str, DeviceStats]              # old version, same devices, before
    installed_at: float | None = None                # when the last device finished
    shadow: Mapping[str, ShadowResult] = field(default_factory=dict)  # device -> its run
    offline_since: Mapping[str, float] = field(default_factory=dict)  # offline -> last seen
    quality: QualityObservation | None = None       # drift, estimate, feedback (or None)


@dataclass(frozen=True)
class Verdict:
    decision: str                  # "wait" | "pass" | "fail"
    reason: str = ""
    gate: str | None = None        # which gate failed
    measured: dict[str, Any] = field(default_factory=dict)


def _wait(reason: str, **measured: Any) -> Verdict:
    return Verdict("wait", reason, None, measured)


def _fail(gate: str, reason: str, **measured: Any) -> Verdict:
    return Verdict("fail", reason, gate, measured)


def offline_deadlines(obs: WaveObservation, policy: "Policy") -> dict[str, float]:
    """Offline devices of the wave that have not reported an outcome -> their own
    deadline: the later of the wave's start and when each was last seen, plus
    ``offline_grace_s``."""
    return {d: max(obs.started_at, obs.offline_since[d]) + policy.offline_grace_s
            for d in obs.devices if d in obs.offline_since and d not in obs.outcomes}


def _names(devices: Any, limit: int = 10) -> str:
    devices = sorted(devices)
    more = f" and {len(devices) - limit} more" if len(devices) > limit else ""
    return ", ".join(devices[:limit]) + more


def install_gate(obs: WaveObservation, policy: "Policy", now: float) -> Verdict | None:
    """None once enough devices serve the new version; otherwise wait or fail. Offline
    devices past their deadline are waited for, skipped or failed (``policy.offline``)."""
    gates, timeout_s = policy.gates, policy.wave_timeout_s
    deadlines = offline_deadlines(obs, policy)
    expired = {d for d, at in deadlines.items() if now >= at}
    devices = [d for d in obs.devices if not (policy.offline == "skip" and d in expired)]
    outcomes = dict(obs.outcomes)
    if policy.offline == "fail":
        outcomes.update({d: (StatusEvent.FAILED, "offline") for d in expired})
    n = len(devices)
    serving = sum(1 for d in devices if outcomes.get(d, ("",))[0] == StatusEvent.SERVING)
    failed = {d: outcomes[d][1] for d in devices
              if outcomes.get(d, ("",))[0] == StatusEvent.FAILED}
    allowed_failures = n - math.ceil(gates.min_install_success * n - 1e-9)
    measured = {"devices": n, "serving": serving, "failed": len(failed),
                "skipped": len(obs.devices) - n}
    if len(failed) > allowed_failures:
        reasons = sorted({r or "unknown" for r in failed.values()})
        return _fail("install_success",
                     f"install success {serving}/{n} below {gates.min_install_success:.0%} "
                     f"(failed: {', '.join(reasons)}; {_names(failed)})", **measured)
    missing = [d for d in devices if d not in outcomes]
    if not missing:
        return None
    if now - obs.started_at > timeout_s:
        if len(failed) + len(missing) > allowed_failures:
            return _fail("install_success", f"{len(missing)} of {n} devices did not "
                         f"install within {timeout_s:.0f}s: {_names(missing)}", **measured)
        return None
    offline = [d for d in missing if d in deadlines]
    text = f"installing: {serving + len(failed)}/{n} reported; waiting on {_names(missing)}"
    if offline:
        soonest = min(deadlines[d] for d in offline)
        then = {"wait": "then waits until the wave's timeout", "skip": "then skipped",
                "fail": "then counted as failed"}[policy.offline]
        text += (f" ({len(offline)} offline: {_names(offline, 5)}; deadline in "
                 f"{max(0.0, soonest - now):.0f}s, {then})")
    return _wait(text, waiting_on=missing[:50], offline=offline[:50], **measured)


def shadow_gate(obs: WaveObservation, gates: Gates) -> Verdict | None:
    """Fails as soon as one device of the wave reported a shadow run below the threshold
    (the rollout's ``min_shadow_agreement``, else the release's own) or short of the
    samples the release asked for. Checked before the install gate: a device that
    reverted its candidate for disagreeing shows here, with the agreement it measured."""
    runs = {d: obs.shadow[d] for d in obs.devices if d in obs.shadow}
    low: dict[str, float] = {}
    for device, run in runs.items():
        limit = gates.min_shadow_agreement if gates.min_shadow_agreement is not None \
            else run.min_agreement
        if limit is not None and (run.agreement is None or run.agreement < limit
                                  or run.compared < run.samples):
            low[device] = limit
    if not low:
        return None
    measured = [runs[d].agreement for d in low if runs[d].agreement is not None]
    agreement = statistics.fmean(measured) if measured else 0.0
    compared = sum(runs[d].compared for d in low)
    return _fail("shadow", f"shadow agreement {agreement:.1%} below {max(low.values()):.1%} "
                 f"on {len(low)} of {len(obs.devices)} device(s) ({compared} samples "
                 "compared with the served version)", agreement=agreement,
                 shadow_devices=len(runs), below=sorted(low))


def latency_ratio(new: Mapping[str, DeviceStats],
                  old: Mapping[str, DeviceStats]) -> tuple[float | None, int]:
    """Median of new/old p50 over devices that measured both; and how many did."""
    ratios = [new[d].p50_ms / old[d].p50_ms for d in new
              if d in old and new[d].p50_ms and old[d].p50_ms and new[d].requests > 0]
    return (statistics.median(ratios), len(ratios)) if ratios else (None, 0)


def evaluate_wave(obs: WaveObservation, policy: Policy, now: float) -> Verdict:
    g = policy.gates
    verdict = shadow_gate(obs, g) or install_gate(obs, policy, now)
    if verdict is not None:
        return verdict
    since = obs.installed_at if obs.installed_at is not None else obs.started_at
    stats = [obs.new_stats[d] for d in obs.devices if d in obs.new_stats]
    requests = sum(s.requests for s in stats)
    errors = sum(s.errors for s in stats)
    timed_out = now - obs.started_at > policy.wave_timeout_s
    seen: dict[str, Any] = {}
    drifted = quality_drift(obs.quality, g.quality_limits(), seen)  # need not soak first
    if drifted is not None:
        return _fail(drifted.gate, drifted.reason, requests=requests, **seen)
    if requests < g.min_requests or now - since < policy.soak_s:
        if timed_out:
            return _fail("traffic", f"only {requests} requests served on the new version "
                         f"within {policy.wave_timeout_s:.0f}s (need {g.min_requests})",
                         requests=requests)
        return _wait(f"soaking: {requests}/{g.min_requests} requests, "
                     f"{max(0.0, now - since):.0f}/{policy.soak_s:.0f}s", requests=requests)
    rate = errors / requests if requests else 0.0  # min_requests=0: no traffic needed
    measured: dict[str, Any] = {"requests": requests, "errors": errors, "error_rate": rate}
    if rate > g.max_error_rate:
        return _fail("error_rate", f"error rate {rate:.1%} above "
                     f"{g.max_error_rate:.1%} ({errors}/{requests})", **measured)
    ratio, paired = latency_ratio({d: obs.new_stats[d] for d in obs.devices
                                   if d in obs.new_stats}, obs.baseline)
    measured.update(latency_ratio=ratio, paired_devices=paired)
    if ratio is not None and ratio > g.max_latency_ratio:
        new_p50 = statistics.median(s.p50_ms for s in stats if s.p50_ms)
        return _fail("latency", f"p50 latency {ratio:.2f}x the previous version on the same "
                     f"{paired} device(s) ({new_p50:.2f} ms; limit "
                     f"{g.max_latency_ratio:.2f}x)", **measured)
    failure = quality_check(obs.quality, g.quality_limits(), measured)
    if failure is not None:
        return _fail(failure.gate, failure.reason, **measured)
    agree = [obs.shadow[d].agreement for d in obs.devices
             if d in obs.shadow and obs.shadow[d].agreement is not None]
    if agree:  # all at or above the threshold (shadow_gate), recorded with the verdict
        measured.update(agreement=statistics.fmean(agree), shadow_devices=len(agree))
    elif g.min_shadow_agreement is not None:  # the rollout demands a shadow run
        if timed_out:
            return _fail("shadow", "no shadow agreement reported (does the release ask "
                         "for shadow testing?)", **measured)
        return _wait("waiting for shadow agreement", **measured)
    return Verdict("pass", "all gates passed", None, measured)


def staging_verdict(devices: tuple[str, ...], outcomes: Mapping[str, tuple[str, str | None]],
                    started_at: float, now: float, timeout_s: float) -> Verdict:
    """All-or-none, before the switch: "pass" (commit) once every device reported
    ``held``; "fail" (discard everywhere) as soon as one failed or the deadline passed."""
    held = [d for d in devices if outcomes.get(d, ("",))[0] == StatusEvent.HELD]
    failed = {d: outcomes[d][1] for d in devices
              if outcomes.get(d, ("",))[0] == StatusEvent.FAILED}
    measured = {"devices": len(devices), "held": len(held), "failed": len(failed)}
    if failed:
        why = ", ".join(f"{d}: {r or 'unknown'}" for d, r in sorted(failed.items()))
        return _fail("all_or_none", f"{len(failed)} of {len(devices)} device(s) could not "
                     f"stage the new version ({why}); none switches", **measured)
    if len(held) == len(devices):
        return Verdict("pass", f"all {len(devices)} devices staged", None, measured)
    if now - started_at > timeout_s:
        missing = sorted(set(devices) - set(held))
        return _fail("all_or_none", f"{len(missing)} of {len(devices)} device(s) did not "
                     f"stage within {timeout_s:.0f}s ({', '.join(missing[:10])}); "
                     "none switches", **measured)
    return _wait(f"staging: {len(held)}/{len(devices)} held", **measured)


def failure_event(policy: Policy) -> Event:
    if policy.all_or_none or policy.on_failure == "rollback":
        return Event.GATE_FAILED_ROLLBACK
    return Event.GATE_FAILED_PAUSE


# --- the rollout record -----------------------------------------------------------------------

@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    from_version: int | None
    to_version: int
    target: dict[str, str | None]     # {"group": ..., "tag": ...}
    policy: Policy
    waves: tuple[tuple[str, ...], ...]
    created_by: str
    created_at: float
    state: State = State.RUNNING
    wave: int = 0                     # index of the current wave
    wave_started_at: float | None = None
    wave_installed_at: float | None = None  # when the current wave's install gate passed
    committed_at: float | None = None  # all-or-none: when the one commit went out
    acted: str = ""                   # the state whose side effects the runner carried out
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)  # device -> desired published at
    reason: str = ""                  # why it stopped (or finished)
    verdicts: tuple[dict[str, Any], ...] = ()  # per finished wave
    waiting: dict[str, Any] = field(default_factory=dict)  # the current wave's last "wait"

    def apply(self, event: Event, reason: str = "") -> "Rollout":
        return replace(self, state=transition(self.state, event),
                       reason=reason or self.reason)

    @property
    def moved(self) -> list[str]:
        return sorted(self.sent)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(state=self.state.value, policy=self.policy.to_dict(),
                   waves=[list(w) for w in self.waves], verdicts=list(self.verdicts))
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Rollout":
        doc = dict(doc)
        doc.update(state=State(doc["state"]), policy=Policy.from_dict(doc["policy"]),
                   waves=tuple(tuple(w) for w in doc["waves"]),
                   verdicts=tuple(doc.get("verdicts", ())))
        return cls(**doc)


__all__ = ["ACTIVE", "FINAL", "OFFLINE_POLICIES", "TRANSITIONS", "DeviceStats", "Event",
           "Gates", "Policy", "Rollout", "ShadowResult", "State", "TransitionError", "Verdict",
           "WaveObservation", "evaluate_wave", "failure_event", "install_gate",
           "jitter_offset_s", "latency_ratio", "offline_deadlines", "parse_waves",
           "plan_waves", "shadow_gate", "staging_verdict", "transition", "version_text"]
