"""``scripts/cluster-check``: edgeship on real broker clusters on this machine.

For each broker — a two-node ejabberd cluster (Debian's package, ``mod_mqtt``, joined with
``ejabberdctl join_cluster``, clients log in with a user name and password), a two-node aedes
2 cluster (npm, MQTT 5; mqemitter-redis + aedes-persistence-redis on Debian's redis-server)
and, for reference, one Mosquitto — it runs ``edgeship broker check`` across the nodes, then
for each transport (MQTT, HTTP) the loop of ``tests.support.broker_loop``: two fleet servers
on node A sharing one registry, three agents on node B (one started after the release):
release → every agent serving, telemetry in the registry, no duplicate transfer answers,
a bad release halting its rollout. One row per broker × transport; exit 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from edgeship.fleet.broker import Mosquitto
from edgeship.fleet.broker_check import CheckSettings, check_broker
from edgeship.fleet.cli_provision import _print_check
from tests.support.broker_loop import BrokerLoop, LoopResult, run_loop
from tests.support.brokers import AedesCluster, BrokerUnavailable, EjabberdCluster


class _MosquittoOne:
    """One Mosquitto (no clustering): the reference row, with shared subscriptions."""

    name = "mosquitto"
    username = password = None

    def __init__(self) -> None:
        self.broker = Mosquitto()

    @property
    def urls(self) -> list[str]:
        return [self.broker.url, self.broker.url]

    def start(self) -> "_MosquittoOne":
        self.broker.start()
        return self

    def version(self) -> str:
        out = subprocess.run([self.broker.binary, "-h"], capture_output=True, text=True)
        first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
        return first.replace("mosquitto version", "mosquitto").strip() or "mosquitto"

    def stop(self) -> None:
        self.broker.cleanup()


def _clusters(names: list[str]):
    makers = {"ejabberd": EjabberdCluster, "aedes": AedesCluster, "mosquitto": _MosquittoOne}
    for name in names:
        yield name, makers[name]


def run_broker(name: str, make, transports: list[str], fleets: int,
               timeout_s: float) -> tuple[str, list[dict]]:
    rows = []
    started = time.monotonic()
    cluster = make()
    try:
        cluster.start()
    except (BrokerUnavailable, RuntimeError) as e:
        cluster.stop()
        return f"{name}: not started ({e})", [_row(name, "-", t, None, str(e), 0)
                                               for t in transports]
    version = cluster.version()
    try:
        start_s = time.monotonic() - started
        a, b = cluster.urls[0], cluster.urls[-1]
        report = check_broker(CheckSettings(url=a, other_url=b if b != a else None,
                                            username=cluster.username,
                                            password=cluster.password))
        print(f"\n== {version}: {len(set(cluster.urls))} node(s), started in {start_s:.1f}s; "
              f"edgeship broker check {a}" + (f" --also {b}" if b != a else ""), flush=True)
        _print_check(report, b if b != a else None, width=140)
        for transport in transports:
            rows.append(_one_loop(name, cluster, transport, fleets, timeout_s))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        cluster.stop()
    return version, rows


def _one_loop(name: str, cluster, transport: str, fleets: int, timeout_s: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"cluster-check-{name}-{transport}-"))
    started = time.monotonic()
    loop = None
    try:
        loop = BrokerLoop(root, cluster.urls[0], cluster.urls[-1], transport=transport,
                          fleets=fleets, username=cluster.username, password=cluster.password,
                          tag=f"{name[:3]}{transport}{int(time.time()) % 100000}")
        loop.start()
        result = run_loop(loop, timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - one failed row, the others still run
        result = LoopResult(transport, fleets, problems=[f"set-up: {e}"])
    finally:
        if loop is not None:
            loop.close()
        shutil.rmtree(root, ignore_errors=True)
    return _row(name, f"{len(set(cluster.urls))}", transport, result, "",
                time.monotonic() - started)


def _row(broker: str, nodes: str, transport: str, r: LoopResult | None, error: str,
         wall_s: float) -> dict:
    if r is None:
        return {"broker": broker, "nodes": nodes, "transport": transport, "ok": False,
                "problems": [error]}
    return {"broker": broker, "nodes": nodes, "transport": transport, "ok": r.ok,
            "fleet_servers": r.fleet_servers, "transfers": "/".join(sorted(set(
                r.transfer_modes))), "release_to_serving_s": _round(r.release_to_serving_s),
            "late_agent_serving_s": _round(r.late_agent_serving_s),
            "telemetry_devices": r.telemetry_devices, "served_per_fleet": r.served_per_fleet,
            "duplicate_answers": r.duplicate_answers, "catch_ups": r.catch_ups,
            "rollout": r.rollout.split(":")[0] if r.rollout else "-",
            "wall_s": round(wall_s, 1), "problems": r.problems}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="edgeship on broker clusters (fleet servers on node A, agents on node B)")
    cols = ("broker", "nodes", "transport", "fleet servers (transfers)", "release→serving s",
            "late agent s", "telemetry", "chunk answers per server", "duplicates",
            "rollout (bad release)", "result")
    for c in cols:
        t.add_column(c)
    for r in rows:
        if "fleet_servers" not in r:
            t.add_row(r["broker"], r["nodes"], r["transport"], *["-"] * 7,
                      "FAIL: " + "; ".join(r["problems"]))
            continue
        t.add_row(r["broker"], r["nodes"], r["transport"],
                  f"{r['fleet_servers']} ({r['transfers']})", str(r["release_to_serving_s"]),
                  str(r["late_agent_serving_s"]), f"{r['telemetry_devices']}/3",
                  "/".join(map(str, r["served_per_fleet"])), str(r["duplicate_answers"]),
                  r["rollout"], "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"]))
    Console(width=200).print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", default="ejabberd,aedes,mosquitto",
                   help="comma-separated: ejabberd, aedes, mosquitto")
    p.add_argument("--transports", default="mqtt,http")
    p.add_argument("--fleet-servers", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=90.0, help="per step")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")
    rows, versions = [], []
    for name, make in _clusters(args.brokers.split(",")):
        version, broker_rows = run_broker(name, make, args.transports.split(","),
                                          args.fleet_servers, args.timeout_s)
        versions.append(version)
        rows += broker_rows
    print()
    _table(rows)
    print("brokers: " + "; ".join(versions))
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "rows": rows}, indent=2))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
