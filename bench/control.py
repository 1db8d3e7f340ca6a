"""``scripts/bench-control``: the fleet control plane at 10,000 devices on one machine.

For each registry backend (SQLite file, PostgreSQL server): a real Mosquitto, a real
``edgeship fleet serve`` process with its dashboard, and simulated devices
(:mod:`bench.sim_devices`: real MQTT 5 clients, presence, telemetry, announcements and
desired state, metadata and manifest transfers). Measures release → every device reporting
the new version (as the registry records it), failures, fleet-server CPU and peak RSS,
broker CPU, and how long the dashboard's device page takes at that many rows."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench.fleet import EDGESHIP, Sample, proc_usage
from edgeship.fleet.auth import Role, TokenStore
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.registry import Registry
from edgeship.fleet.tuf_repo import init_repository

PAGES = {"page 1 by id": "limit=50",
         "sorted by temperature": "limit=50&sort=temperature&order=desc",
         "offline, search": "limit=50&online=false&q=sim-0",
         "last page": "limit=50&offset={last}", "summary": None}


class Run:
    """Broker + fleet server + simulator processes for one backend."""

    def __init__(self, root: Path, db: str, size: int, per_process: int,
                 telemetry_s: float, workers: int) -> None:
        self.root, self.db, self.size = root, db, size
        self.keys, self.repo = root / "keys", root / "repo"
        init_repository(self.keys, self.repo)
        self.broker = Mosquitto(extra_conf="log_dest none\nmax_connections -1\n").start()
        Registry(db).close()  # migrations run before the clock starts
        self.server = self._serve(workers)
        self.sims = [subprocess.Popen(
            [sys.executable, "-m", "bench.sim_devices", "--url", self.broker.url,
             "--first", str(first), "--count", str(min(per_process, size - first)),
             "--telemetry-s", str(telemetry_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            stderr=open(root / f"sim-{first}.log", "w"))
            for first in range(0, size, per_process)]

    def _serve(self, workers: int, tries: int = 3) -> subprocess.Popen:
        """``fleet serve`` on a free port; another free port if that one was taken
        between looking and binding (other work shares this machine)."""
        for _ in range(tries):
            self.port = free_port()
            log = self.root / "fleet-server.log"
            server = subprocess.Popen(
                [*EDGESHIP, "fleet", "serve", "--mqtt", self.broker.url, "--repo",
                 str(self.repo), "--db", self.db, "--http-port", str(self.port),
                 "--workers", str(workers)], stdout=subprocess.PIPE, text=True,
                stderr=open(log, "w"))
            if server.stdout.readline().startswith("fleet server serving"):
                return server
            server.wait(30)
        raise RuntimeError(f"fleet serve did not start: {log.read_text()[-500:]}")

    def alive(self) -> None:
        if self.server.poll() is not None:
            raise RuntimeError("the fleet server exited: "
                               f"{(self.root / 'fleet-server.log').read_text()[-500:]}")

    def ready(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        for sim in self.sims:
            line = sim.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"a simulator failed to start (see {self.root}/sim-*.log)")
        try:
            wait(lambda: self.online() >= self.size, timeout_s, "every device online",
                 every=self.alive)
        except TimeoutError:  # measure the release on those that made it, say so
            print(f"only {self.online()} of {self.size} devices came online within "
                  f"{timeout_s:.0f}s (see {self.root}/sim-*.log)", file=sys.stderr, flush=True)
        return time.monotonic() - t0

    def registry(self) -> Registry:
        return Registry(self.db)

    def online(self) -> int:
        reg = self.registry()
        try:
            return reg.fleet_summary()["online"]
        finally:
            reg.close()

    def serving(self, version: int) -> dict:
        reg = self.registry()
        try:
            return reg.install_outcomes("synth", version, 0)
        finally:
            reg.close()

    def close(self) -> list[dict]:
        counters = []
        for sim in self.sims:
            try:
                out, _ = sim.communicate("stop\n", timeout=120)
                counters.append(json.loads(out.strip().splitlines()[-1]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                sim.kill()
        self.server.terminate()
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.broker.cleanup() if hasattr(self.broker, "cleanup") else self.broker.stop()
        return counters


def wait(pred, timeout_s: float, what: str, every=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if every is not None:
            every()
        value = pred()
        if value:
            return value
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def page_times(url: str, token: str, size: int, calls: int = 20) -> dict[str, float]:
    """Median milliseconds per dashboard request (fresh connection each, no ETag)."""
    out = {}
    for name, query in PAGES.items():
        path = "/api/v1/summary" if query is None else \
            "/api/v1/devices?" + query.format(last=max(0, size - 50))
        times = []
        for _ in range(calls):
            req = urllib.request.Request(url + path,
                                         headers={"Authorization": f"Bearer {token}"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            times.append(1000 * (time.perf_counter() - t0))
        out[name] = statistics.median(times)
    return out


def measure(run: Run, bundle: Path, spread_s: float, timeout_s: float) -> dict:
    pids = [run.broker.proc.pid, run.server.pid]
    samples = [Sample() for _ in pids]
    for s, pid in zip(samples, pids):
        s.cpu0, s.peak_rss = proc_usage(pid)

    def sample():
        run.alive()
        for s, pid in zip(samples, pids):
            s.cpu1, rss = proc_usage(pid)
            s.peak_rss = max(s.peak_rss, rss)
    start = time.monotonic()
    out = subprocess.run([*EDGESHIP, "release", str(bundle), "--repo", str(run.repo), "--keys",
                          str(run.keys), "--mqtt", run.broker.url, "--spread-s", str(spread_s),
                          "--db", run.db], capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"release failed: {out.stderr}")
    last = [start]

    def done():
        got = run.serving(1)
        if time.monotonic() - last[0] > 15:
            last[0] = time.monotonic()
            print(f"  {time.monotonic() - start:5.0f}s: {len(got)}/{run.size} serving, "
                  f"load1 {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        return len(got) >= run.size and got
    try:
        outcomes = wait(done, timeout_s, "every device serving", every=sample)
    except TimeoutError:
        outcomes = run.serving(1)
    seconds = time.monotonic() - start
    sample()
    serving = sum(1 for e, _ in outcomes.values() if e == "serving")
    return {"seconds": seconds, "serving": serving, "lost": run.size - serving,
            "broker_cpu_s": samples[0].cpu1 - samples[0].cpu0,
            "fleet_cpu_s": samples[1].cpu1 - samples[1].cpu0,
            "fleet_peak_rss_mb": samples[1].peak_rss, "broker_peak_rss_mb": samples[0].peak_rss}


def one_backend(name: str, db: str, args, bundle: Path, work: Path) -> dict:
    root = work / name
    root.mkdir()
    run = Run(root, db, args.devices, args.per_process, args.telemetry_s, args.workers)
    counters: list[dict] = []
    try:
        up = run.ready(args.online_timeout_s)
        print(f"{name}: {args.devices} devices online in {up:.0f}s, load1 "
              f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        row = measure(run, bundle, args.spread_s, args.timeout_s)
        reg = run.registry()
        token = TokenStore(reg).create("bench", Role.READ)[1]
        reg.close()
        row["pages_ms"] = page_times(f"http://127.0.0.1:{run.port}", token, args.devices)
    finally:
        counters = run.close()
    row.update(backend=name, devices=args.devices, load1=os.getloadavg()[0], online_s=up,
               sim={k: sum(c.get(k, 0) for c in counters) for k in
                    ("requests", "retries", "busy", "failed", "serving", "telemetry")})
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-control")
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--per-process", type=int, default=2500, help="devices per simulator")
    p.add_argument("--spread-s", type=float, default=60.0,
                   help="the release's --spread-s: devices start within this window")
    p.add_argument("--telemetry-s", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=4, help="fleet server worker threads")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="release -> every device serving, at most this long")
    p.add_argument("--online-timeout-s", type=float, default=600.0,
                   help="wait this long for every device to come online")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill
    from tests.support.postgres import fresh_database, running_postgres
    from tests.support.synthetic import write_synthetic_bundle
    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-control-"))
    bundle = write_synthetic_bundle(work / "bundle", version=1, width=64)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min), {os.cpu_count()} cores; "
          f"{args.devices} devices, release spread {args.spread_s:.0f}s", flush=True)
    rows = []
    try:
        with ExitStack() as stack:
            for name in args.backends.split(","):
                if name == "sqlite":
                    db = str(work / "fleet.db")
                else:
                    server = stack.enter_context(running_postgres("max_connections=200"))
                    db = fresh_database(server, "bench")
                rows.append(one_backend(name, db, args, bundle, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows)
    return 0 if all(r["lost"] == 0 for r in rows) else 1


def report(rows: list[dict]) -> None:
    print("\nrelease -> every simulated device reporting the new version")
    print(f"{'registry':>10} {'devices':>8} {'seconds':>8} {'lost':>5} {'fleet cpu s':>12} "
          f"{'fleet peak MiB':>15} {'broker cpu s':>13} {'requests':>9} {'retries':>8} "
          f"{'load1':>6}")
    for r in rows:
        print(f"{r['backend']:>10} {r['devices']:>8} {r['seconds']:>8.1f} {r['lost']:>5} "
              f"{r['fleet_cpu_s']:>12.1f} {r['fleet_peak_rss_mb']:>15.1f} "
              f"{r['broker_cpu_s']:>13.1f} {r['sim']['requests']:>9} "
              f"{r['sim']['retries']:>8} {r['load1']:>6.2f}")
    print("\ndashboard requests at that many rows (median ms of 20)")
    print(f"{'registry':>10} " + " ".join(f"{k:>22}" for k in PAGES))
    for r in rows:
        print(f"{r['backend']:>10} " + " ".join(f"{r['pages_ms'][k]:>22.1f}" for k in PAGES))


if __name__ == "__main__":
    sys.exit(main())
