"""``scripts/bench-fleet``: a real broker, a real fleet server (its own process) and N real
agents (many per worker process). For each fleet size: time from release to the whole fleet
serving a ~2 MB model, failed devices, broker and fleet-server CPU and peak memory. Then a
staged rollout of a 3x slower version, which must halt in its first wave; the reason is
shown by the CLI and read back from the dashboard in headless Chromium."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgeship.fleet.auth import Role, TokenStore
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.registry import Registry
from edgeship.fleet.tuf_repo import init_repository

CLK = os.sysconf("SC_CLK_TCK")
EDGESHIP = [sys.executable, "-c", "import sys; from edgeship.cli import main; sys.exit(main())"]


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / CLK
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


@dataclass
class Sample:
    cpu0: float = 0.0
    cpu1: float = 0.0
    peak_rss: float = 0.0


class Fleet:
    """Broker + fleet server process + agent worker processes for one fleet size."""

    def __init__(self, root: Path, size: int, per_process: int, telemetry_s: float,
                 http_port: int, profile: Path | None = None, install_slots: int = 16) -> None:
        self.root, self.size = root, size
        self.keys, self.repo, self.db = root / "keys", root / "repo", root / "fleet.db"
        init_repository(self.keys, self.repo)
        self.broker = Mosquitto(extra_conf="log_dest none\n").start()
        self.http = f"http://127.0.0.1:{http_port}"
        self.workers: list[subprocess.Popen] = []
        self.server = subprocess.Popen(
            [*EDGESHIP, "fleet", "serve", "--mqtt", self.broker.url, "--repo", str(self.repo),
             "--db", str(self.db), "--http-port", str(http_port), "--workers", "4"],
            stdout=subprocess.DEVNULL, stderr=open(root / "fleet-server.log", "w"))
        try:
            self._start_workers(per_process, telemetry_s, install_slots, profile)
        except BaseException:
            self.close()  # never leave a broker, a server or workers behind
            raise

    def _start_workers(self, per_process: int, telemetry_s: float, install_slots: int,
                       profile: Path | None) -> None:
        for first in range(0, self.size, per_process):
            spy = [] if not (profile and first == 0) else [
                str(Path(sys.executable).with_name("py-spy")), "record", "-f", "raw",
                "-r", "20", "--gil", "-o", str(profile / f"worker-{self.size}.txt"), "--"]
            self.workers.append(subprocess.Popen(
                [*spy, sys.executable, "-m", "bench.fleet_agents", "--url", self.broker.url,
                 "--repo", str(self.repo), "--root", str(self.root / "devices"), "--first",
                 str(first), "--count", str(min(per_process, self.size - first)),
                 "--telemetry-s", str(telemetry_s), "--install-slots", str(install_slots)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                stderr=open(self.root / f"agents-{first}.log", "w")))
        for w in self.workers:
            line = w.stdout.readline()
            while line and not line.startswith("READY"):  # e.g. py-spy's banner
                line = w.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"agent worker failed to start (see "
                                   f"{self.root}/agents-*.log)")
        t0 = time.monotonic()
        self.wait(lambda: self._online() >= self.size, 300, "every agent to come online")
        print(f"  {self.size} agents online {time.monotonic() - t0:.0f}s after their workers "
              f"started; load1 {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    def registry(self) -> Registry:
        return Registry(self.db)

    def _online(self) -> int:
        reg = self.registry()
        try:
            return sum(d.online for d in reg.devices())
        finally:
            reg.close()

    def wait(self, pred, timeout_s: float, what: str, sample: list | None = None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sample is not None:
                self.sample(sample)
            value = pred()
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")

    def pids(self) -> list[int]:
        """Broker, fleet server, then the agent workers."""
        return [self.broker.proc.pid, self.server.pid, *(w.pid for w in self.workers)]

    def sample(self, samples: list[Sample]) -> None:
        for s, pid in zip(samples, self.pids()):
            cpu, rss = proc_usage(pid)
            s.cpu1, s.peak_rss = cpu, max(s.peak_rss, rss)

    def cli(self, *args: str) -> str:
        out = subprocess.run([*EDGESHIP, *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"edgeship {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def send(self, line: str) -> None:
        for w in self.workers:
            w.stdin.write(line + "\n")
            w.stdin.flush()

    def close(self) -> None:
        for w in self.workers:
            try:
                w.stdin.write("stop\n")
                w.stdin.close()
            except OSError:
                pass
        for w in self.workers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
        self.server.terminate()
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.broker.cleanup() if hasattr(self.broker, "cleanup") else self.broker.stop()


def measure_release(fleet: Fleet, bundle: Path, version: int, timeout_s: float,
                    staged: tuple[int, float] | None = None) -> dict:
    """Release and wait for every device to serve it. ``staged=(max_concurrent, jitter_s)``:
    through a one-wave rollout (desired state with jitter and a download cap) instead of the
    fleet-wide announcement."""
    samples = [Sample() for _ in fleet.pids()]
    for s, pid in zip(samples, fleet.pids()):
        s.cpu0, s.peak_rss = proc_usage(pid)
    start = time.monotonic()
    fleet.cli("release", str(bundle), "--repo", str(fleet.repo), "--keys", str(fleet.keys),
              *([] if staged else ["--mqtt", fleet.broker.url]), "--db", str(fleet.db))
    if staged:
        fleet.cli("rollout", "start", "synth", str(version), "--db", str(fleet.db),
                  "--waves", "100", "--max-concurrent", str(staged[0]), "--jitter-s",
                  str(staged[1]), "--min-requests", "0", "--soak-s", "0", "--by", "bench")

    last_print = [start]

    def done():
        reg = fleet.registry()
        try:
            out = reg.install_outcomes("synth", version, 0)
        finally:
            reg.close()
        if time.monotonic() - last_print[0] >= 10:
            last_print[0] = time.monotonic()
            print(f"  {time.monotonic() - start:5.0f}s: {len(out)}/{fleet.size} done, "
                  f"load1 {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        return len(out) >= fleet.size and out

    try:
        outcomes = fleet.wait(done, timeout_s, "the whole fleet", samples)
    except TimeoutError:
        reg = fleet.registry()
        outcomes = reg.install_outcomes("synth", version, 0)
        reg.close()
    elapsed = time.monotonic() - start
    fleet.sample(samples)
    serving = sum(1 for e, _ in outcomes.values() if e == "serving")
    return {"devices": fleet.size, "mode": f"staged {staged[0]}/{staged[1]:.0f}s"
            if staged else "announce", "seconds": elapsed, "serving": serving,
            "failed": fleet.size - serving,
            "broker_cpu_s": samples[0].cpu1 - samples[0].cpu0,
            "broker_rss_mb": samples[0].peak_rss,
            "fleet_cpu_s": samples[1].cpu1 - samples[1].cpu0,
            "fleet_rss_mb": samples[1].peak_rss,
            "agents_cpu_s": sum(s.cpu1 - s.cpu0 for s in samples[2:]),
            "agents_rss_mb": sum(s.peak_rss for s in samples[2:])}


def run_rollout(fleet: Fleet, bundle: Path, traffic_rps: float, soak_s: float,
                out_dir: Path) -> dict:
    fleet.send(f"traffic {traffic_rps}")
    time.sleep(max(12.0, soak_s))  # baseline telemetry of the old version
    fleet.cli("release", str(bundle), "--repo", str(fleet.repo), "--keys", str(fleet.keys),
              "--db", str(fleet.db))
    started = json.loads(fleet.cli(
        "rollout", "start", "synth", "2", "--db", str(fleet.db), "--waves", "1,10,50,100",
        "--soak-s", str(soak_s), "--min-requests", "20", "--max-latency-ratio", "1.5",
        "--jitter-s", "2", "--by", "bench", "--json"))
    rid = started["id"]

    def stopped():
        doc = json.loads(fleet.cli("rollout", "status", rid, "--db", str(fleet.db), "--json"))
        return doc if doc["state"] != "running" else None

    t0 = time.monotonic()
    doc = fleet.wait(stopped, 300, "the rollout to stop")
    result = {"id": rid, "state": doc["state"], "wave": doc["wave"], "reason": doc["reason"],
              "moved": doc["moved"], "devices": doc["devices"],
              "seconds": time.monotonic() - t0,
              "cli": fleet.cli("rollout", "status", rid, "--db", str(fleet.db))}
    reg = fleet.registry()
    try:
        token = TokenStore(reg).create("bench-fleet", Role.READ)[1]
    finally:
        reg.close()
    result["dashboard"] = dashboard_reason(fleet.http, rid, out_dir, token)
    return result


def dashboard_reason(url: str, rid: str, out_dir: Path, token: str) -> str:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "(playwright not installed: dashboard not checked)"
    if not Path("/usr/bin/chromium").exists():
        return "(/usr/bin/chromium missing: dashboard not checked)"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.fill("#token", token)
        page.click("#signin-form button")
        el = page.wait_for_selector(f"[data-rollout-id='{rid}'] [data-reason]", timeout=30_000)
        text = el.inner_text()
        page.screenshot(path=str(out_dir / "bench-fleet-dashboard.png"), full_page=True)
        browser.close()
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-fleet")
    p.add_argument("--sizes", default="100,1000", help="fleet sizes (default 100,1000)")
    p.add_argument("--per-process", type=int, default=250, help="agents per worker process")
    p.add_argument("--install-slots", type=int, default=16,
                   help="installs running at once per worker process (a shared pool)")
    p.add_argument("--telemetry-s", type=float, default=60.0,
                   help="agents' telemetry interval (default: the agent's default, 60 s)")
    p.add_argument("--rollout-telemetry-s", type=float, default=5.0,
                   help="telemetry interval on the fleet that runs the rollout (its gates "
                   "need a few windows of latency within the soak time)")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--rollout-size", type=int, default=0,
                   help="fleet size to run the rollout on (default: the smallest)")
    p.add_argument("--traffic-rps", type=float, default=1.0,
                   help="inference requests per second per device during the rollout")
    p.add_argument("--soak-s", type=float, default=10.0)
    p.add_argument("--skip-rollout", action="store_true", help="only the release rows")
    p.add_argument("--profile", type=Path, default=None,
                   help="run the first agent worker under py-spy; raw stacks go to this dir")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--staged-from", type=int, default=0,
                   help="fleets this large get the release through a one-wave rollout "
                   "(jitter + download cap) instead of the fleet-wide announcement")
    p.add_argument("--max-concurrent", type=int, default=100)
    p.add_argument("--jitter-s", type=float, default=20.0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the fleet on kill
    sizes = [int(s) for s in args.sizes.split(",")]
    rollout_size = args.rollout_size or min(sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    from tests.support.synthetic import write_synthetic_bundle
    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-fleet-"))
    v1 = write_synthetic_bundle(work / "bundles" / "v1", version=1, depth=1)
    v2 = write_synthetic_bundle(work / "bundles" / "v2", version=2, depth=3)
    size_mb = sum(f.stat().st_size for f in v1.iterdir()) / 2**20
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min), {os.cpu_count()} cores; "
          f"bundle {size_mb:.1f} MiB; {args.per_process} agents per process, "
          f"{args.install_slots} install slots each", flush=True)
    rows, rollout = [], None
    try:
        for size in sizes:
            rollout_here = size == rollout_size and not args.skip_rollout
            fleet = Fleet(work / f"n{size}", size, args.per_process,
                          args.rollout_telemetry_s if rollout_here else args.telemetry_s,
                          free_port(), args.profile, args.install_slots)
            try:
                staged = (args.max_concurrent, args.jitter_s) \
                    if args.staged_from and size >= args.staged_from else None
                rows.append(measure_release(fleet, v1, 1, args.timeout_s, staged))
                rows[-1]["load1"] = os.getloadavg()[0]
                print(json.dumps(rows[-1]), flush=True)
                if rollout_here:
                    rollout = run_rollout(fleet, v2, args.traffic_rps, args.soak_s, args.out)
                    print(json.dumps({k: v for k, v in rollout.items() if k != "cli"}),
                          flush=True)
            finally:
                fleet.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(rows, rollout)
    ok = all(r["failed"] == 0 for r in rows) and (rollout is None or (
        rollout["state"] == "halted" and rollout["wave"] == 1))
    return 0 if ok else 1


def print_report(rows: list[dict], rollout: dict | None) -> None:
    print("\nrelease -> whole fleet serving a 2 MB model")
    print(f"{'devices':>8} {'release':>16} {'seconds':>8} {'failed':>7} {'broker cpu s':>13} "
          f"{'broker MiB':>11} {'fleet cpu s':>12} {'fleet MiB':>10} {'agents cpu s':>13} "
          f"{'agents MiB':>11} {'load1':>6}")
    for r in rows:
        print(f"{r['devices']:>8} {r['mode']:>16} {r['seconds']:>8.1f} {r['failed']:>7} "
              f"{r['broker_cpu_s']:>13.1f} {r['broker_rss_mb']:>11.1f} "
              f"{r['fleet_cpu_s']:>12.1f} {r['fleet_rss_mb']:>10.1f} "
              f"{r['agents_cpu_s']:>13.1f} {r['agents_rss_mb']:>11.0f} {r['load1']:>6.2f}")
    if rollout:
        print(f"\nrollout of a 3x slower version ({rollout['devices']} devices): "
              f"{rollout['state']} in wave {rollout['wave']} after "
              f"{rollout['seconds']:.0f}s, {rollout['moved']} device(s) moved")
        print(f"CLI:\n{rollout['cli']}")
        print(f"dashboard says: {rollout['dashboard']}")


if __name__ == "__main__":
    sys.exit(main())
