"""Rollouts, I/O side: commands that record intent in the registry (used by the CLI and the
REST API, from any process) and a runner inside the fleet server that carries it out —
publishes per-device desired state with jitter and a concurrency cap, feeds the registry's
observations to :func:`fleet.rollout.evaluate_wave`, and acts on the verdicts.

Only the runner publishes: a command changes the rollout's state in the registry and the
runner, on its next tick, does what that state requires (``acted`` remembers what it did).
Every decision goes to the audit log with who, what, which devices and why.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Callable

from edgeship.agent.errors import ConfigError
from edgeship.agent.protocol import DesiredState, StatusEvent
from edgeship.fleet.registry import Registry
from edgeship.fleet.rollout import (FINAL, DeviceStats, Event, Policy, Rollout, ShadowResult,
                                    State, WaveObservation, evaluate_wave, failure_event,
                                    install_gate, jitter_offset_s, offline_deadlines,
                                    plan_waves, shadow_gate, staging_verdict, version_text)

logger = logging.getLogger(__name__)

PublishDesired = Callable[[str, DesiredState], None]
StopRelease = Callable[..., None]  # (model, version, *, stopped: bool)

_COMMANDS = {"pause": Event.PAUSE, "resume": Event.RESUME, "abort": Event.ABORT,
             "rollback": Event.ROLLBACK}


# --- commands (any process) ---------------------------------------------------------------

def start_rollout(registry: Registry, *, model: str, version: int, policy: Policy,
                  actor: str, group: str | None = None, tag: str | None = None,
                  from_version: int | None = None, now: float | None = None,
                  token: str | None = None) -> Rollout:
    now = registry.now() if now is None else now
    devices = registry.devices(group=group, tag=tag)
    if not devices:
        raise ConfigError(f"no devices in group={group!r} tag={tag!r}", key="group")
    if version not in [v for _, v, *_ in registry.releases(model)]:
        raise ConfigError(f"{model} v{version} was never released (edgeship release)",
                          key="version")
    busy = [r["id"] for r in registry.rollouts([State.RUNNING.value, State.PAUSED.value,
                                                State.HALTED.value, State.ROLLING_BACK.value])
            if r["model"] == model]
    if busy:
        raise ConfigError(f"rollout {busy[0]} of {model} is still open; abort or finish it",
                          key="model")
    if from_version is None:
        running = Counter(d.running(model) for d in devices if d.running(model) is not None)
        from_version = running.most_common(1)[0][0] if running else None
    rid = f"r-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(2)}"
    waves = plan_waves([d.id for d in devices], policy.waves, seed=rid)
    rollout = Rollout(id=rid, model=model, from_version=from_version, to_version=version,
                      target={"group": group, "tag": tag}, policy=policy,
                      waves=tuple(tuple(w) for w in waves), created_by=actor,
                      created_at=now)
    registry.save_rollout(rid, model, rollout.state.value, rollout.to_dict())
    registry.audit(actor, "rollout.start", rid, token=token, model=model, version=version,
                   from_version=from_version, target=rollout.target,
                   waves=[len(w) for w in waves], policy=policy.to_dict())
    return rollout


def load(registry: Registry, rollout_id: str) -> Rollout:
    doc = registry.rollout(rollout_id)
    if doc is None:
        raise ConfigError(f"no rollout {rollout_id!r}", key="rollout")
    return Rollout.from_dict(doc)


def control(registry: Registry, rollout_id: str, command: str, actor: str,
            reason: str = "", token: str | None = None) -> Rollout:
    """pause | resume | abort | rollback: valid in the current state or TransitionError."""
    rollout = load(registry, rollout_id)
    why = reason or f"{command} by {actor}"
    new = rollout.apply(_COMMANDS[command], why)
    registry.save_rollout(new.id, new.model, new.state.value, new.to_dict())
    registry.audit(actor, f"rollout.{command}", new.id, token=token, reason=why,
                   state=new.state.value)
    return new


# --- the runner (inside the fleet server) --------------------------------------------------

LEASE_NAME = "rollout-runner"


def default_holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RolloutRunner:
    """Drives every open rollout of one registry. Several fleet servers may share a
    registry; only the holder of the ``rollout-runner`` lease acts (renewed every tick,
    taken over by another runner ``lease_ttl_s`` after the holder stops renewing; default
    the larger of 10 s and 5 ticks)."""

    def __init__(self, registry: Registry, publish: PublishDesired,
                 stop_release: StopRelease | None = None, *, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.time, lease_ttl_s: float | None = None,
                 holder: str | None = None) -> None:
        lease_ttl_s = max(10.0, 5 * tick_s) if lease_ttl_s is None else lease_ttl_s
        if lease_ttl_s <= 2 * tick_s:
            raise ConfigError(f"lease_ttl_s {lease_ttl_s} must exceed 2 x tick_s {tick_s}",
                              key="lease_ttl_s")
        self.registry = registry
        self._publish = publish
        self._stop_release = stop_release
        self.tick_s = tick_s
        self._clock = clock
        self.lease_ttl_s = lease_ttl_s
        self.holder = holder or default_holder()
        self.is_leader = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fleet-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.is_leader:  # hand over now rather than after the lease expires
            self.is_leader = False
            try:
                self.registry.release_lease(LEASE_NAME, self.holder)
            except Exception:  # the database may be gone; the lease then just expires
                logger.warning("could not release the rollout-runner lease", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # one bad rollout must not stop the others
                logger.exception("rollout tick failed")

    def tick(self) -> None:
        if not self._lead():
            return
        for doc in self.registry.rollouts():
            if doc["state"] in [s.value for s in FINAL] and doc.get("acted") == doc["state"]:
                continue
            try:
                rollout = Rollout.from_dict(doc)
            except (ConfigError, KeyError, TypeError, ValueError) as e:  # one bad record
                logger.error("rollout %s: unreadable record, skipped: %s", doc.get("id"), e)
                continue
            new = self.step(rollout)
            if new != rollout:
                self._save(rollout, new)

    def _lead(self) -> bool:
        """Take or renew the lease; on taking over, re-publish the desired state of open
        rollouts (a publish the previous holder recorded but never sent is not lost; a
        device ignores a ``seq`` it already has)."""
        held = self.registry.acquire_lease(LEASE_NAME, self.holder, self.lease_ttl_s)
        if held and not self.is_leader:
            logger.info("rollout runner %s now leads", self.holder)
            self.registry.audit("fleet", "runner.lead", None, holder=self.holder)
            self._republish_open()
        elif not held and self.is_leader:
            logger.warning("rollout runner %s lost the lease", self.holder)
        self.is_leader = held
        return held

    def _republish_open(self) -> None:
        open_states = [s.value for s in State if s not in FINAL]
        for doc in self.registry.rollouts(open_states):
            for rec in self.registry.desired(model=doc["model"]):
                if rec.rollout == doc["id"]:
                    self._publish(rec.device, DesiredState(rec.model, rec.version, rec.seq,
                                                           rec.rollout, hold=rec.hold))

    def _save(self, loaded: Rollout, new: Rollout) -> None:
        """Keep a state a command wrote since we loaded (pause/abort win over our tick)."""
        current = self.registry.rollout(new.id)
        if current is not None and current["state"] != loaded.state.value:
            new = replace(new, state=State(current["state"]), reason=current["reason"],
                          acted=loaded.acted)
        self.registry.save_rollout(new.id, new.model, new.state.value, new.to_dict())

    def step(self, r: Rollout) -> Rollout:
        now = self._clock()
        if r.state == State.RUNNING:
            return self._run(r, now)
        if r.state == State.ROLLING_BACK:
            return self._roll_back(r, now)
        if r.state == State.ABORTED and r.acted != State.ABORTED.value:
            return self._abort(r)
        return r if r.acted == r.state.value else replace(r, acted=r.state.value)

    # --- running ----------------------------------------------------------------------

    def _run(self, r: Rollout, now: float) -> Rollout:
        if r.acted != State.RUNNING.value and self._stop_release is not None:
            self._stop_release(r.model, r.to_version, stopped=False)  # a resumed rollout
        r = replace(r, acted=State.RUNNING.value)
        if r.wave_started_at is None:
            r = self._start_wave(r, now)
        if r.policy.all_or_none and r.committed_at is None:
            return self._stage_all(r, now)
        r = self._dispatch(r, now)
        obs = self._observe(r)
        if r.wave_installed_at is None and install_gate(obs, r.policy, now) is None:
            r = replace(r, wave_installed_at=now)
            obs = replace(obs, installed_at=now)
        verdict = evaluate_wave(obs, r.policy, now)
        if verdict.decision == "wait":
            return replace(r, waiting={"wave": r.wave, "reason": verdict.reason,
                                       **verdict.measured})
        r = replace(r, waiting={})
        record = {"wave": r.wave, "devices": len(r.waves[r.wave]), "at": now,
                  "decision": verdict.decision, "gate": verdict.gate,
                  "reason": verdict.reason, "measured": verdict.measured}
        r = replace(r, verdicts=(*r.verdicts, record))
        if verdict.decision == "fail":
            return self._halt(r, verdict.reason, record)
        last = r.wave + 1 >= len(r.waves)
        self.registry.audit("fleet", "rollout.wave_passed", r.id, **record)
        logger.info("rollout %s: wave %d/%d passed (%s)", r.id, r.wave + 1, len(r.waves),
                    verdict.reason or "gates met")
        if last:
            return r.apply(Event.LAST_WAVE_PASSED, f"all {len(r.waves)} waves passed")
        return replace(r.apply(Event.WAVE_PASSED), wave=r.wave + 1, wave_started_at=None,
                       wave_installed_at=None)

    def _start_wave(self, r: Rollout, now: float) -> Rollout:
        baseline = {}
        if r.from_version is not None:
            since = now - r.policy.baseline_window_s
            stats = self.registry.version_stats(r.model, r.from_version, since)
            baseline = {d: vars(stats[d]) for d in r.waves[r.wave] if d in stats}
        self.registry.audit("fleet", "rollout.wave_started", r.id, wave=r.wave,
                            devices=list(r.waves[r.wave]), baseline_devices=len(baseline))
        logger.info("rollout %s: %s v%d wave %d/%d started (%d devices)", r.id, r.model,
                    r.to_version, r.wave + 1, len(r.waves), len(r.waves[r.wave]))
        return replace(r, wave_started_at=now, baseline={**r.baseline, **baseline})

    def _dispatch(self, r: Rollout, now: float, hold: bool = False) -> Rollout:
        """Publish desired state to due devices of the wave, at most max_concurrent
        devices downloading (sent, no outcome yet) at once."""
        events = (StatusEvent.HELD if hold else StatusEvent.SERVING, StatusEvent.FAILED)
        outcomes = self.registry.install_outcomes(r.model, r.to_version, r.created_at,
                                                  events)
        in_flight = sum(1 for d in r.sent if d not in outcomes)
        room = r.policy.max_concurrent - in_flight
        due = [d for d in r.waves[r.wave] if d not in r.sent and now >= r.wave_started_at
               + jitter_offset_s(r.id, d, r.policy.jitter_s)][:max(0, room)]
        if not due:
            return r
        for device in due:
            self._desire(r, device, r.to_version, hold=hold)
        self.registry.audit("fleet", "rollout.desired", r.id, wave=r.wave,
                            version=r.to_version, devices=due, hold=hold)
        logger.info("rollout %s: wave %d: %s v%d sent to %d device(s)%s (%d in flight)", r.id,
                    r.wave + 1, "staging" if hold else "install", r.to_version, len(due),
                    "" if len(due) > 3 else ": " + ", ".join(due), in_flight + len(due))
        return replace(r, sent={**r.sent, **{d: now for d in due}})

    def _desire(self, r: Rollout, device: str, version: int, hold: bool = False) -> None:
        record, changed = self.registry.set_desired(device, r.model, version, rollout=r.id,
                                                    hold=hold)
        if changed:
            self._publish(device, DesiredState(r.model, version, record.seq, r.id,
                                               hold=hold))

    # --- all-or-none: every device stages, then one commit --------------------------

    def _stage_all(self, r: Rollout, now: float) -> Rollout:
        """Desired state with ``hold`` to every device (jitter, download cap); when all
        reported ``held``, the commit; when one failed or the deadline passed, the
        rollback (every device discards what it holds; none ever switched)."""
        r = self._dispatch(r, now, hold=True)
        wave = r.waves[r.wave]
        outcomes = self.registry.install_outcomes(r.model, r.to_version, r.created_at,
                                                  (StatusEvent.HELD, StatusEvent.FAILED))
        shadow = WaveObservation(wave, r.created_at, outcomes, {}, {},
                                 shadow=self._shadow_results(r, wave))
        verdict = shadow_gate(shadow, r.policy.gates) or \
            staging_verdict(wave, outcomes, r.wave_started_at or r.created_at, now,
                            r.policy.wave_timeout_s)
        if verdict.decision == "wait":
            return r
        if verdict.decision == "fail":
            record = {"wave": r.wave, "devices": len(wave), "at": now, "phase": "staging",
                      "decision": "fail", "gate": verdict.gate, "reason": verdict.reason,
                      "measured": verdict.measured}
            return self._halt(replace(r, verdicts=(*r.verdicts, record)), verdict.reason,
                              record)
        for device in wave:  # back to back, no jitter: the switch is simultaneous
            self._desire(r, device, r.to_version, hold=False)
        self.registry.audit("fleet", "rollout.commit", r.id, version=r.to_version,
                            devices=list(wave), held=verdict.measured["held"])
        logger.info("rollout %s: all %d devices hold v%d: commit", r.id, len(wave),
                    r.to_version)
        return replace(r, committed_at=now, wave_started_at=now)

    def _observe(self, r: Rollout) -> WaveObservation:
        wave = r.waves[r.wave]
        since = r.wave_installed_at or r.wave_started_at or r.created_at
        stats = self.registry.version_stats(r.model, r.to_version, since)
        return WaveObservation(
            devices=wave, started_at=r.wave_started_at or r.created_at,
            outcomes=self.registry.install_outcomes(r.model, r.to_version, r.created_at),
            new_stats={d: DeviceStats(s.requests, s.errors, s.p50_ms, s.agreement)
                       for d, s in stats.items() if d in wave},
            baseline={d: DeviceStats(**b) for d, b in r.baseline.items()},
            installed_at=r.wave_installed_at, shadow=self._shadow_results(r, wave),
            offline_since=self.registry.offline_since(wave),
            quality=self.registry.quality.observation(
                r.model, r.to_version, r.from_version, wave,
                r.wave_started_at or r.created_at,
                self.registry.now() - r.policy.baseline_window_s))

    def _shadow_results(self, r: Rollout, wave: tuple[str, ...]) -> dict[str, ShadowResult]:
        return {d: ShadowResult.from_report(doc) for d, doc in self.registry
                .shadow_results(r.model, r.to_version, r.created_at).items() if d in wave}

    def _halt(self, r: Rollout, reason: str, record: dict) -> Rollout:
        event = failure_event(r.policy)
        why = f"wave {r.wave + 1}/{len(r.waves)} failed: {reason}"
        logger.warning("rollout %s halted: %s", r.id, why)
        self.registry.audit("fleet", "rollout.halted", r.id, **{
            **record, "reason": why, "then": event.value, "devices": list(r.waves[r.wave])})
        return r.apply(event, why)

    # --- stopping ---------------------------------------------------------------------

    def _kill_transfers(self, r: Rollout) -> None:
        if self._stop_release is not None:
            self._stop_release(r.model, r.to_version, stopped=True)

    def _abort(self, r: Rollout) -> Rollout:
        """Kill switch: stop transfers of the new version; devices that had not finished
        go back to wanting the old version (those already serving it stay: rollback)."""
        self._kill_transfers(r)
        outcomes = self.registry.install_outcomes(r.model, r.to_version, r.created_at)
        unfinished = [d for d in r.moved
                      if outcomes.get(d, ("",))[0] != StatusEvent.SERVING]
        if r.from_version is not None:
            for device in unfinished:
                self._desire(r, device, r.from_version)
        self.registry.audit("fleet", "rollout.aborted", r.id, reason=r.reason,
                            devices=unfinished, transfers_stopped=self._stop_release is not None)
        return replace(r, acted=State.ABORTED.value)

    def _roll_back(self, r: Rollout, now: float) -> Rollout:
        if r.acted != State.ROLLING_BACK.value:
            self._kill_transfers(r)
            if r.from_version is not None:
                for device in r.moved:
                    self._desire(r, device, r.from_version)
            self.registry.audit("fleet", "rollout.rolling_back", r.id, reason=r.reason,
                                version=r.from_version, devices=r.moved)
            r = replace(r, acted=State.ROLLING_BACK.value, wave_started_at=now)
        if r.from_version is None:
            return r.apply(Event.ROLLBACK_DONE)
        running = {d.id: d.running(r.model) for d in self.registry.devices()}
        left = [d for d in r.moved if running.get(d) not in (r.from_version, None)]
        timed_out = now - (r.wave_started_at or now) > r.policy.wave_timeout_s
        if left and not timed_out:
            return r
        self.registry.audit("fleet", "rollout.rolled_back", r.id, version=r.from_version,
                            devices=r.moved, not_reverted=left)
        done = r.apply(Event.ROLLBACK_DONE)
        return replace(done, acted=State.ROLLED_BACK.value)


# --- views (CLI, REST API, dashboard) --------------------------------------------------------

LISTED = 50  # device names listed per wave and kind (the counts are always complete)


def _wave_doc(i: int, devices: tuple[str, ...], rollout: Rollout, outcomes: dict,
              held: dict, verdict: dict | None, offline: dict[str, float]) -> dict:
    states = {d: outcomes.get(d, ("",))[0] for d in devices}
    active = i == rollout.wave and rollout.state == State.RUNNING
    status = ("passed" if (verdict or {}).get("decision") == "pass" else
              "failed" if verdict else "active" if active else
              "stopped" if i == rollout.wave else "pending")
    pending = sorted(d for d in devices if d in rollout.sent and not states[d])
    obs = WaveObservation(devices, rollout.wave_started_at or rollout.created_at,
                          {d: o for d, o in outcomes.items() if o[0]}, {}, {},
                          offline_since=offline)
    deadlines = offline_deadlines(obs, rollout.policy) if i == rollout.wave else {}
    failed = {d: outcomes[d][1] or "unknown" for d in devices if states[d] == StatusEvent.FAILED}
    return {"wave": i + 1, "devices": len(devices),
            "sent": sum(1 for d in devices if d in rollout.sent),
            "serving": sum(1 for s in states.values() if s == StatusEvent.SERVING),
            "failed": len(failed),
            "held": sum(1 for d in devices if held.get(d, ("",))[0] == StatusEvent.HELD),
            "status": status, "verdict": verdict,
            "pending_devices": pending[:LISTED],
            "failed_devices": dict(sorted(failed.items())[:LISTED]),
            "offline_devices": [{"device": d, "last_seen": offline[d], "deadline": at}
                                for d, at in sorted(deadlines.items())[:LISTED]],
            "waiting": rollout.waiting.get("reason") if active and
            rollout.waiting.get("wave") == i else None}


def progress(registry: Registry, rollout: Rollout) -> dict:
    """The rollout as a document: per wave, device counts from what devices reported,
    which devices it waits on (offline ones with their deadline) and which failed, why.
    ``moved``: devices told to run the new version; ``serving``: those that say they do."""
    outcomes = registry.install_outcomes(rollout.model, rollout.to_version,
                                         rollout.created_at)
    held = {} if not rollout.policy.all_or_none else registry.install_outcomes(
        rollout.model, rollout.to_version, rollout.created_at,
        (StatusEvent.HELD, StatusEvent.FAILED))
    verdicts = {v["wave"]: v for v in rollout.verdicts}
    current = rollout.waves[rollout.wave] if rollout.waves else ()
    offline = registry.offline_since(current)
    waves = [_wave_doc(i, devices, rollout, outcomes, held, verdicts.get(i), offline)
             for i, devices in enumerate(rollout.waves)]
    doc = rollout.to_dict()
    doc.pop("baseline", None)
    doc.pop("sent", None)
    phase = None if not rollout.policy.all_or_none else \
        "committed" if rollout.committed_at is not None else "staging"
    doc.update(waves=waves, wave=rollout.wave + 1, devices=sum(len(w) for w in rollout.waves),
               moved=len(rollout.sent), serving=sum(w["serving"] for w in waves),
               failed=sum(w["failed"] for w in waves), phase=phase,
               from_text=version_text(rollout.from_version),
               to_text=version_text(rollout.to_version))
    return doc
