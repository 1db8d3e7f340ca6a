"""Write errors during an update are the environment's fault, not the model's: with the
state directory's disk full (a real tmpfs, ENOSPC) or file descriptors exhausted (a real
RLIMIT_NOFILE, EMFILE), the agent reports ``failed`` with ``disk_full`` /
``resource_exhausted``, keeps serving its version, leaves no staging, resume or temp files,
and retries by itself once the environment recovers — without blocking the version, even
when it is restarted again and again meanwhile."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.delivery.helpers import start_agent
from tests.support import wait_until
from tests.support.agent_process import AgentProcess, leftovers, served, write_config
from tests.support.loop_env import predict
from tests.support.resources import (limit_fds, open_fds, resize_disk, restore_fds,
                                     small_disk)
from tests.support.synthetic import sample_inputs, write_synthetic_bundle

MiB = 1024 * 1024
SMALL, BIG = 256, 1100  # ~0.3 MB and ~4.8 MB of weights


def _release(env, tmp_path: Path, version: int, width: int) -> None:
    env.release(write_synthetic_bundle(tmp_path / f"b{version}", version=version,
                                       width=width))


def _clean(state: Path) -> None:
    """Once the update rests: no staging, temp or partial download anywhere."""
    wait_until(lambda: all(json.loads(p.read_bytes())["state"] == "idle"
                           for p in (state / "updates").glob("*.json")), 30,
               "the update to rest")
    left = [p for p in leftovers(state)] + [str(p) for p in state.rglob("*.resume")]
    assert left == [], f"left behind after giving up: {left}"


def test_disk_full_fails_cleanly_keeps_serving_and_retries_when_there_is_room(
        loop_env, tmp_path):
    state = loop_env.root / "devices" / "dev"
    with small_disk(state, 3 * MiB):
        agent = start_agent(loop_env, "dev", resource_retry_min_s=0.5)
        _release(loop_env, tmp_path, 1, SMALL)
        loop_env.wait_serving("dev", 1)
        _release(loop_env, tmp_path, 2, BIG)
        ev = loop_env.wait_failed("dev", 2)
        assert ev["reason"] == "disk_full", ev
        _clean(state)
        assert predict(agent, "synth", sample_inputs(SMALL, 2))["version"] == 1
        resize_disk(state, 64 * MiB)
        loop_env.wait_serving("dev", 2, timeout_s=60)  # no new announcement needed
        assert predict(agent, "synth", sample_inputs(BIG, 2))["version"] == 2
        agent.stop()
        loop_env.agents.remove(agent)


def _start(state: Path, env) -> AgentProcess:
    cfg = state / "agent.toml"
    if not cfg.exists():
        cfg = write_config(state, state.name, env.url, env.repo, resource_retry_min_s=0.5,
                           trial_window_s=0.0)
    return AgentProcess(cfg).start()


def test_restarts_after_disk_full_failures_never_block_a_good_version(loop_env, tmp_path):
    """The outside run: the update thread died on ENOSPC with its record in `downloading`,
    and four watchdog restarts later the version was blocked as a `restart_loop`. Now each
    try ends in `failed` (disk_full) with the record at rest, so restarts after it count
    nothing: the version installs once there is room."""
    state = loop_env.root / "devices" / "proc"
    with small_disk(state, 3 * MiB):
        agent = _start(state, loop_env)
        try:
            _release(loop_env, tmp_path, 1, SMALL)
            loop_env.wait_serving("proc", 1)
            _release(loop_env, tmp_path, 2, BIG)
            since = 0.0
            for _ in range(5):  # a watchdog restarting the agent after each failure
                ev = loop_env.watcher.wait_for(
                    lambda e: e.get("device") == "proc" and e.get("version") == 2 and
                    e.get("event") == "failed" and e.get("ts", 0) > since, 60)
                assert ev["reason"] == "disk_full", ev
                agent.kill()
                since = time.time()
                agent = _start(state, loop_env)
            assert 2 not in agent.record("synth").get("blocked", [])
            resize_disk(state, 64 * MiB)
            wait_until(lambda: (served(agent.port, "synth") or {}).get("version") == 2, 90,
                       "v2 to serve once there is room")
            _clean(state)
        finally:
            agent.stop()


def test_file_descriptors_exhausted_fail_cleanly_and_retry(loop_env, tmp_path):
    state = loop_env.root / "devices" / "fds"
    agent = _start(state, loop_env)
    try:
        _release(loop_env, tmp_path, 1, SMALL)
        loop_env.wait_serving("fds", 1)
        pid = agent.proc.pid
        old = limit_fds(pid, open_fds(pid) + 1)
        try:
            _release(loop_env, tmp_path, 2, SMALL + 8)
            ev = loop_env.wait_failed("fds", 2)
            assert ev["reason"] == "resource_exhausted", ev
            assert agent.alive and served(agent.port, "synth")["version"] == 1
        finally:
            restore_fds(pid, old)
        wait_until(lambda: (served(agent.port, "synth") or {}).get("version") == 2, 60,
                   "v2 to serve once descriptors are free")
        _clean(state)
    finally:
        agent.stop()
