"""The attack families the soak replays (issue: what an outside attack run broke). Each
case attacks the running fleet once and returns how it was turned away; it raises
:class:`CaseFailed` when the attack got through or something broke. After every case the
runner also checks that every process is alive and every agent serves its version."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from securesystemslib.signer import CryptoSigner

from edgeship.agent.protocol import DesiredState, Topics, encode
from edgeship.fleet.tuf_repo import released_versions
from tests.fleet.helpers import make_bundle, make_tar
from tests.support.agent_process import leftovers
from tests.support.attacks import BAD_MANIFESTS, edit_manifest, snapshot
from tests.support.resources import fill_disk

from bench.soak_env import MODEL, ROOT, SoakEnv, process_usage

NOT_AUTHORIZED = 0x87
HUGE = "9" * 5000
DEEP = "[" * 30_000 + "]" * 30_000


class CaseFailed(Exception):
    """The attack was not turned away cleanly."""


def _raw(kind: str, **fields: str) -> bytes:
    body = ", ".join(f'"{k}": {v}' for k, v in fields.items())
    return f'{{"schema": 1, "kind": "{kind}", {body}}}'.encode()


def _release_cli(env: SoakEnv, bundle: Path, timeout_s: float = 120) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "edgeship.cli", "release", str(bundle),
                           "--repo", str(env.repo), "--keys", str(env.keys)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stderr.strip()


# --- the release path (host side) ---------------------------------------------------------

_manifest_cases = itertools.cycle(sorted(BAD_MANIFESTS))


def hostile_manifest(env: SoakEnv) -> str:
    case = next(_manifest_cases)
    work = env.root / "work" / f"manifest-{time.monotonic_ns()}"
    bundle = make_bundle(work, model=MODEL, version=env.released + 1)
    edit_manifest(bundle, BAD_MANIFESTS[case])
    before = snapshot(env.repo)
    code, err = _release_cli(env, bundle)
    shutil.rmtree(work, ignore_errors=True)
    if code != 2 or len(err.splitlines()) != 1:
        raise CaseFailed(f"{case}: exit {code}, stderr {err[-300:]!r}")
    if snapshot(env.repo) != before:
        raise CaseFailed(f"{case}: the repository changed")
    return f"{case}: exit 2"


def killed_release_then_update(env: SoakEnv) -> str:
    """kill -9 a release while it unpacks; the next (real) release cleans up after it and
    every agent installs it."""
    work = env.root / "work" / f"kill-{time.monotonic_ns()}"
    tar = make_tar(make_bundle(work, model="bulk", version=1,
                               payload=os.urandom(8 * 1024**2)))
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "release", str(tar),
                             "--repo", str(env.repo), "--keys", str(env.keys)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not any(env.repo.glob(".bundle-*/*")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(work, ignore_errors=True)
    version = env.release()
    left = [p.name for p in env.repo.rglob(".*") if p.name != ".lock"]
    if left:
        raise CaseFailed(f"temp files left after the next release: {left[:5]}")
    if "bulk" in released_versions(env.repo):
        raise CaseFailed("the killed release was published")
    env.wait_all_serving(version)
    return f"killed release cleaned; v{version} installed everywhere"


# --- MQTT: what a hostile device or a buggy fleet component sends --------------------------

def hostile_device_reports(env: SoakEnv) -> str:
    """Mallory's own topics (the ACL lets it write them): the fleet counts, never breaks."""
    before = env.fleet_counter("malformed")
    payloads = [(Topics.status("mallory"), _raw("status", event='"serving"', version=HUGE)),
                (Topics.status("mallory"), _raw("status", event='"serving"', model='"m"',
                                                version=str(2**64))),
                (Topics.telemetry("mallory"), _raw("telemetry", requests=str(2**63))),
                (Topics.presence("mallory"), DEEP.encode())]
    for topic, payload in payloads:
        env.mallory.publish(topic, payload)
    deadline = time.monotonic() + 10
    while env.fleet_counter("malformed") < before + len(payloads):
        if time.monotonic() > deadline:
            raise CaseFailed(f"fleet counted {env.fleet_counter('malformed') - before} of "
                             f"{len(payloads)} malformed reports")
        time.sleep(0.1)
    return f"{len(payloads)} counted malformed"


_control = itertools.cycle([
    ("release", lambda env: (Topics.release(MODEL),
                             _raw("release", model=f'"{MODEL}"', version=HUGE,
                                  released_at="0"))),
    ("release", lambda env: (Topics.release(MODEL), DEEP.encode())),
    ("desired", lambda env: (Topics.desired(env.devices[0]),
                             _raw("desired", model=f'"{MODEL}"', version="1", seq=HUGE))),
    ("desired", lambda env: (Topics.desired(env.devices[0]),
                             _raw("desired", model=f'"{MODEL}"', version="1",
                                  seq=str(2**64)))),
])


def hostile_control_messages(env: SoakEnv) -> str:
    """Malformed announcements and desired states from an authorised fleet identity: every
    agent that gets one answers ``rejected`` / ``malformed_message``."""
    kind, build = next(_control)
    topic, payload = build(env)
    mark = env.watcher.mark()
    env.voice.publish(topic, payload)
    targets = env.devices if kind == "release" else env.devices[:1]
    for device in targets:
        ev = env.watcher.wait_for(lambda e: e.get("device") == device
                                  and e.get("event") == "rejected", mark, 15)
        if ev is None or ev.get("reason") != "malformed_message":
            raise CaseFailed(f"{device}: no rejected/malformed_message for a hostile {kind} "
                             f"(got {ev})")
    return f"{kind}: rejected by {len(targets)} agent(s)"


def acl_refusals(env: SoakEnv) -> str:
    """A device certificate cannot write announcements, desired states or another device's
    topics on the locked-down broker."""
    victim = env.devices[0]
    topics = [Topics.release(MODEL), Topics.desired(victim), Topics.status(victim),
              Topics.telemetry(victim), Topics.transfer_response(victim),
              Topics.transfer_request(victim)]
    for topic in topics:
        rc = env.mallory.publish(topic, encode("desired", {"model": MODEL, "version": 1,
                                                           "seq": 2**62}))
        if rc != NOT_AUTHORIZED:
            raise CaseFailed(f"broker accepted mallory's publish on {topic} (rc {rc:#x})")
    return f"{len(topics)} publishes refused by the ACL"


# --- transfers ------------------------------------------------------------------------------

def transfer_slot_exhaustion(env: SoakEnv) -> str:
    """Mallory opens a 1-byte transfer of every target and goes quiet; another device still
    gets its chunks at once."""
    paths = [f"targets/{p.relative_to(env.repo / 'targets')}"
             for p in (env.repo / "targets").rglob("*") if p.is_file()]
    random.shuffle(paths)
    for path in paths[:40]:
        env.mallory.send_request(path, 0, 1)
    status, data = env.probe.fetch(paths[0], 0, 4096, timeout_s=10)
    if status != 200 or not data:
        raise CaseFailed(f"a legitimate transfer got {status} while mallory held slots")
    return f"mallory opened {min(40, len(paths))} transfers; probe served 200"


# --- the health check ------------------------------------------------------------------------

def _declare_wrong_input_shape(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    manifest["inputs"][0]["shape"] = [None, 5]  # the model takes [N, 4]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def mismatched_signature(env: SoakEnv) -> str:
    """A signed release whose manifest declares [N, 5] for a [N, 4] model: every agent
    refuses it in the health check and keeps its version."""
    mark = env.watcher.mark()
    version = env.release(_declare_wrong_input_shape)
    for device in env.devices:
        ev = env.watcher.wait_for(lambda e: e.get("device") == device and e.get("event") ==
                                  "failed" and e.get("version") == version, mark, 60)
        if ev is None or ev.get("reason") != "model_signature_mismatch":
            raise CaseFailed(f"{device}: {ev}")
    return f"v{version} refused by {len(env.devices)} agent(s)"


# --- the update machinery on the device ------------------------------------------------------

CTL = "ctl"  # a second model, governed by signed desired state


def _ctl_ready(env: SoakEnv) -> int:
    """Once: every agent runs ``ctl`` v1 and follows a signed desired state for it."""
    if getattr(env, "ctl_seq", 0):
        return env.ctl_seq
    env.release(model=CTL)
    deadline = time.monotonic() + 120
    while any(env.serving(d, CTL) != 1 for d in env.devices):
        if time.monotonic() > deadline:
            raise CaseFailed("ctl v1 was not installed everywhere")
        time.sleep(0.2)
    env.ctl_seq = 1
    for device in env.devices:
        env.voice.publish(Topics.desired(device), env.sign_desired(
            device, DesiredState(CTL, 1, env.ctl_seq)).to_bytes(), retain=True)
    return env.ctl_seq


def _rejected(env: SoakEnv, device: str, mark: int, timeout_s: float = 15) -> dict | None:
    return env.watcher.wait_for(lambda e: e.get("device") == device and e.get("event") ==
                                "rejected" and e.get("model") == CTL, mark, timeout_s)


def desired_capture(env: SoakEnv) -> str:
    """An order with a seq far above the fleet's, unsigned and then signed by a stranger:
    refused (``bad_signature``); the fleet's next signed order is still followed."""
    seq = _ctl_ready(env)
    device = random.choice(env.devices)
    stranger = CryptoSigner.generate_ed25519()
    forged = DesiredState(CTL, 1, 2**62, epoch=2**62)
    sig = stranger.sign(forged.signing_bytes(device))
    signed_by_stranger = replace(forged, sig=(sig.keyid, sig.signature))
    orders = (("unsigned", DesiredState(CTL, 1, 2**62)), ("a stranger's key",
                                                          signed_by_stranger))
    for name, msg in orders:
        mark = env.watcher.mark()
        env.voice.publish(Topics.desired(device), msg.to_bytes(), retain=True)
        ev = _rejected(env, device, mark)
        if ev is None or ev.get("reason") != "bad_signature":
            raise CaseFailed(f"{device}: order signed by {name}: {ev}")
    env.ctl_seq = seq + 1
    mark = env.watcher.mark()
    env.voice.publish(Topics.desired(device), env.sign_desired(
        device, DesiredState(CTL, 1, env.ctl_seq)).to_bytes(), retain=True)
    if _rejected(env, device, mark, 3) is not None:
        raise CaseFailed(f"{device} refused the fleet's own order")
    return f"{device}: both forged orders refused; the fleet's next one followed"


def name_flood(env: SoakEnv) -> str:
    """200 announcements of models nobody released: nothing on the devices, telemetry
    small, every agent counts them once the signed metadata says no."""
    before = {d: _seen(env, d) for d in env.devices}
    tag = time.monotonic_ns()
    for i in range(200):
        name = f"fake-{tag}-{i}"
        env.voice.publish(Topics.release(name), encode("release", {
            "model": name, "version": 1, "released_at": time.time()}))
    deadline = time.monotonic() + 60
    while any(_seen(env, d) < before[d] + 200 for d in env.devices):
        if time.monotonic() > deadline:
            counted = {d: _seen(env, d) - before[d] for d in env.devices}
            raise CaseFailed(f"agents counted {counted} of 200 fake announcements")
        time.sleep(0.5)
    for device in env.devices:
        kept = {p.name for p in (env.root / "devices" / device / "models").iterdir()}
        if kept - {MODEL, CTL}:
            raise CaseFailed(f"{device} keeps model directories {sorted(kept)}")
        if env.watcher.telemetry_bytes.get(device, 0) > 8 * 1024:
            raise CaseFailed(f"{device} telemetry is {env.watcher.telemetry_bytes[device]} B")
    return "200 fake names counted by every agent; nothing kept"


def _seen(env: SoakEnv, device: str) -> int:
    counts = env.watcher.telemetry.get(device, {}).get("announcements", {})
    return counts.get("unconfirmed", 0) + counts.get("dropped", 0)


def disk_full(env: SoakEnv) -> str:
    """The disk agent's state fills up during an update: ``failed``/``disk_full``, the old
    version keeps serving, nothing left behind; with room again it installs by itself."""
    device = env.disk_device
    if device is None:
        return "skipped: no tmpfs (not root)"
    state = env.root / "devices" / device
    filler = fill_disk(state, leave_bytes=8 * 1024)
    mark = env.watcher.mark()
    problem = None
    try:
        version = env.release()
        ev = env.watcher.wait_for(lambda e: e.get("device") == device and e.get("version") ==
                                  version and e.get("event") in ("failed", "serving"),
                                  mark, 60)
        if ev is None or ev.get("reason") != "disk_full":
            problem = f"{device}: {ev}"
        elif env.serving(device) != env.expected:
            problem = f"{device} serves v{env.serving(device)} after the failure"
        elif left := _lasting_leftovers(state):
            problem = f"{device} left {left[:5]}"
    finally:
        filler.unlink(missing_ok=True)
    env.wait_all_serving(version, timeout_s=60)  # also when the case failed: in step again
    if problem:
        raise CaseFailed(problem)
    return f"{device}: disk_full, kept serving, installed v{version} once there was room"


def _lasting_leftovers(state: Path, wait_s: float = 1.5) -> list[str]:
    """Staging, temp and partial files present now and ``wait_s`` later (the agent keeps
    retrying: a try in progress writes its record through a temp file for a moment)."""
    def found() -> set[str]:
        return set(leftovers(state)) | {str(p) for p in state.rglob("*.resume")}
    first = found()
    time.sleep(wait_s)
    return sorted(first & found())


# --- the local API (what any local user can send) -------------------------------------------

def _post(port: int, body: bytes, timeout_s: float = 60) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", f"/v1/models/{MODEL}/predict", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _predict_unix(env: SoakEnv, device: str) -> int:
    from edgeship.agent.client import AgentClient
    with AgentClient(env.socket_url(device)) as client:
        return int(client.predict(MODEL, np.ones((1, 4), np.float32)).shape[0])


def idle_connection_flood(env: SoakEnv) -> str:
    """300 idle TCP connections to one agent's API: the Unix socket keeps serving, TCP
    answers 503 past its cap or serves, and the connections go away again."""
    device = env.devices[0]
    port, pid = env.ports[device], env.procs[device].pid
    fds = process_usage(pid)[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    try:
        if _predict_unix(env, device) != 1:
            raise CaseFailed("the Unix socket did not serve during the flood")
        status = _post(port, json.dumps({"inputs": [[1, 2, 3, 4]]}).encode(), 10)
        if status not in (200, 503):
            raise CaseFailed(f"TCP answered {status} during the flood")
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while process_usage(pid)[1] > fds + 4:
        if time.monotonic() > deadline:
            raise CaseFailed(f"open fds stayed at {process_usage(pid)[1]} (before: {fds})")
        time.sleep(0.2)
    return f"unix socket served; TCP {status}; fds back to {process_usage(pid)[1]}"


_API_BODIES = itertools.cycle([
    ("5000-digit integer", b'{"inputs": [[1' + b"0" * 5000 + b', 1, 1, 1]]}'),
    ("30k-deep nesting", b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
    ("NaN literal", b'{"inputs": [[NaN, 1, 1, 1]]}'),
    ("16 MiB of floats", b'{"inputs": [' + b",".join([b"[0.5,0.5,0.5,0.5]"] * (
        (16 << 20) // 18)) + b"]}"),
])


def hostile_api_bodies(env: SoakEnv) -> str:
    """Bodies that used to cost a 500 or hundreds of MB: a 4xx, bounded memory."""
    name, body = next(_API_BODIES)
    device = env.devices[-1]
    rss = process_usage(env.procs[device].pid)[0]
    status = _post(env.ports[device], body)
    grown = process_usage(env.procs[device].pid)[0] - rss
    if not 400 <= status < 500:
        raise CaseFailed(f"{name}: HTTP {status}")
    if grown > 200:
        raise CaseFailed(f"{name}: RSS grew by {grown:.0f} MiB")
    return f"{name}: HTTP {status}, RSS +{grown:.0f} MiB"


FAMILIES: dict[str, list[Callable[[SoakEnv], str]]] = {
    "release: hostile manifest fields": [hostile_manifest],
    "release: kill -9, then a real update": [killed_release_then_update],
    "fleet: hostile device reports": [hostile_device_reports],
    "agent: hostile control messages": [hostile_control_messages],
    "broker: ACL refusals": [acl_refusals],
    "fleet: transfer-slot exhaustion": [transfer_slot_exhaustion],
    "agent: manifest signature mismatch": [mismatched_signature],
    "agent: desired-state capture": [desired_capture],
    "agent: model-name flood": [name_flood],
    "agent: disk full during an update": [disk_full],
    "api: idle connection flood": [idle_connection_flood],
    "api: hostile bodies": [hostile_api_bodies],
}
