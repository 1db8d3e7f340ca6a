"""scripts/bench-swap: hot swap under steady load.

A real agent process serves a tiny model; client threads send a steady request rate
(default 200 req/s) to its local HTTP API while the fleet releases three good updates and
then one that fails on live traffic during its trial, so the agent reverts (swaps the old
version back in). A separate probe client sends the input that breaks the bad version; its
failures are the model's, not the swap's, and are counted apart.

Prints failed requests (target 0), p50/p99 latency in steady state vs during swaps (target:
p99 during swaps <= 3x steady), and per update the time from "download complete" (the
agent's ``verifying`` event) to "serving new version" (its ``serving`` event) and to the
first response answered by the new version.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    start: float
    latency_ms: float
    status: int
    version: int | None


class Client(threading.Thread):
    """Keep-alive HTTP client sending ``rate`` requests/s on a fixed schedule."""

    def __init__(self, port: int, rate: float, rows: list, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.period, self.stop = port, 1.0 / rate, stop
        self.body = json.dumps({"inputs": rows}).encode()
        self.samples: list[Sample] = []

    def _call(self, conn: http.client.HTTPConnection) -> tuple[int, int | None]:
        conn.request("POST", "/v1/models/tiny/predict", body=self.body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read() or b"{}")
        return resp.status, doc.get("version")

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        due = time.perf_counter()
        while not self.stop.is_set():
            due += self.period
            t0, wall = time.perf_counter(), time.time()
            try:
                status, version = self._call(conn)
            except (OSError, http.client.HTTPException, ValueError):
                status, version = 0, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.samples.append(Sample(wall, (time.perf_counter() - t0) * 1000, status,
                                       version))
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                due = time.perf_counter()  # fell behind: do not burst to catch up


def _pct(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from edgeship.fleet.broker import Mosquitto
    from tests.support import models
    from tests.support.loop_env import Fleet
    from tests.support.agent_process import AgentProcess, served, write_config
    from tests.support import wait_until
    from tests.support.loop_env import LoopEnv

    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-swap-"))
    broker = Mosquitto().start()
    fleet = Fleet(LoopEnv(broker.url, work), work)
    agent = AgentProcess(write_config(work / "dev", "bench-swap", broker.url,
                                      fleet.env.repo, trial_window_s=args.trial_s,
                                      trial_min_requests=5, threads=1))
    stop = threading.Event()
    try:
        agent.start()
        fleet.release("tiny", 1, models.good(1))
        wait_until(lambda: (served(agent.port, "tiny") or {}).get("version") == 1, 120, "v1")
        rows = models.golden_inputs()[:1].tolist()
        clients = [Client(agent.port, args.rate / args.clients, rows, stop)
                   for _ in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(args.steady_s)
        updates = _updates(fleet, agent, models, args)
        time.sleep(args.steady_s)
        stop.set()
        for c in clients:
            c.join(timeout=15)
        return _report(fleet, clients, updates, args)
    finally:
        stop.set()
        agent.stop()
        fleet.env.close()
        broker.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _updates(fleet, agent, models, args) -> list[dict]:
    from tests.support.agent_process import predict
    from tests.support import wait_until

    done = []
    for v in (2, 3, 4):
        fleet.release("tiny", v, models.good(v))
        wait_until(lambda: "committed" in fleet.chain("bench-swap", v), 120, f"v{v}")
        done.append({"version": v, "kind": "update"})
        time.sleep(args.gap_s)
    fleet.release("tiny", 5, models.fails_on_large_inputs(5))
    wait_until(lambda: "serving" in fleet.chain("bench-swap", 5), 120, "v5 on trial")
    probe_failures = 0
    while "failed" not in fleet.chain("bench-swap", 5):
        status, _ = predict(agent.port, "tiny", [[50.0, 0, 0, 0]])  # breaks v5 only
        probe_failures += status != 200
        time.sleep(0.05)
    done.append({"version": 5, "kind": "reverted in trial", "probe_failures": probe_failures})
    time.sleep(args.gap_s)
    return done


def _windows(fleet, updates: list[dict]) -> list[tuple[float, float]]:
    """Swap windows: from download complete to 0.5 s after committed/failed."""
    out = []
    for u in updates:
        ev: dict[str, float] = {}
        for e in fleet.events("bench-swap", u["version"]):
            if "reverted_from" not in e:  # v4 serves again after v5's revert: not a swap-in
                ev.setdefault(e["event"], e["ts"])
        end = ev.get("committed", ev.get("failed"))
        out.append((ev["verifying"], end + 0.5))
        u["download_to_serving_s"] = ev["serving"] - ev["verifying"]
        u["reverted_at"] = ev.get("failed")
    return out


def _report(fleet, clients: list[Client], updates: list[dict], args) -> int:
    samples = sorted((s for c in clients for s in c.samples), key=lambda s: s.start)
    windows = _windows(fleet, updates)
    in_swap = [s for s in samples if any(a <= s.start <= b for a, b in windows)]
    steady = [s for s in samples if not any(a <= s.start <= b for a, b in windows)]
    failed = [s for s in samples if s.status != 200]
    p50s, p99s = _pct([s.latency_ms for s in steady])
    p50w, p99w = _pct([s.latency_ms for s in in_swap])
    duration = samples[-1].start - samples[0].start if samples else 0
    load = os.getloadavg()
    print(f"\nbench-swap: {len(samples)} requests in {duration:.1f} s "
          f"({len(samples) / max(duration, 1e-9):.0f} req/s, target {args.rate:g}); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cores")
    print(f"\n{'phase':<14}{'requests':>10}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'steady':<14}{len(steady):>10}{sum(s.status != 200 for s in steady):>8}"
          f"{p50s:>9.2f}{p99s:>9.2f}")
    print(f"{'during swaps':<14}{len(in_swap):>10}{sum(s.status != 200 for s in in_swap):>8}"
          f"{p50w:>9.2f}{p99w:>9.2f}")
    ratio = p99w / p99s if p99s else float("nan")
    print(f"\nfailed requests: {len(failed)} (target 0); p99 during swaps / steady: "
          f"{ratio:.2f}x (target <= 3x)")
    print(f"\n{'version':<9}{'what':<20}{'download->serving s':>21}{'first new response s':>22}")
    for u in updates:
        first = next((s.start for s in samples if s.version == u["version"]), None)
        base = next(e["ts"] for e in fleet.events("bench-swap", u["version"])
                    if e["event"] == "verifying")
        first_s = f"{first - base:.3f}" if first else "-"
        print(f"v{u['version']:<8}{u['kind']:<20}{u['download_to_serving_s']:>21.3f}"
              f"{first_s:>22}")
    revert = updates[-1]
    back = next((s.start for s in samples if s.version == 4 and revert["reverted_at"]
                 and s.start > revert["reverted_at"]), None)
    print(f"\nv5 reverted; probe requests that hit v5's bug: {revert['probe_failures']} "
          f"(the model's failures, not counted above); first v4 response after the "
          f"revert: {'%.3f s' % (back - revert['reverted_at']) if back else '-'}")
    return 0 if not failed and ratio <= 3 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="requests per second")
    p.add_argument("--clients", type=int, default=4, help="client threads")
    p.add_argument("--steady-s", type=float, default=5.0, help="steady load before/after")
    p.add_argument("--gap-s", type=float, default=2.0, help="pause between updates")
    p.add_argument("--trial-s", type=float, default=2.0, help="agent trial window")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
