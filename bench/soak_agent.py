"""Soak: replay the attack families against real agents behind a locked-down broker for a
bounded time, then print cases run / rejected cleanly / failed per family, and each
process's RSS and open file descriptors before and after. Run by ``scripts/soak-agent``.

A case counts as *rejected cleanly* when the attack was turned away the documented way
(reason code, exit code, ACL refusal, bounded effect) and afterwards every process is alive
and every agent still serves the version it served before."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

from bench.soak_cases import FAMILIES, CaseFailed
from bench.soak_env import SoakEnv


def _check_invariants(env: SoakEnv) -> None:
    dead = env.dead()
    if dead:
        raise CaseFailed(f"process(es) died: {dead}")
    for device in env.devices:
        if env.serving(device) != env.expected:
            raise CaseFailed(f"{device} serves v{env.serving(device)}, not v{env.expected}")


def run_case(env: SoakEnv, name: str, case) -> tuple[bool, str]:
    try:
        how = case(env)
        _check_invariants(env)
        return True, how
    except CaseFailed as e:
        return False, str(e)
    except Exception as e:  # an error of the harness or the system under test: a failure
        return False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def soak(env: SoakEnv, duration_s: float, families: list[str], verbose: bool,
         after_first_pass) -> dict:
    """Round-robin over the families' cases until ``duration_s`` (every case at least
    once); ``after_first_pass()`` runs once every case ran once (one-time allocations done:
    the steady-state baseline)."""
    results: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    failures: list[str] = []
    deadline = time.monotonic() + duration_s
    order = [(name, case) for name in families for case in FAMILIES[name]]
    i = 0
    while time.monotonic() < deadline or i < len(order):
        if i == len(order):
            after_first_pass()
        name, case = order[i % len(order)]
        i += 1
        ok, how = run_case(env, name, case)
        row = results[name]
        row[0] += 1
        row[1 if ok else 2] += 1
        if not ok:
            failures.append(f"{name}: {how}")
        if verbose:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {how.splitlines()[0][:150]}", flush=True)
    return {"results": dict(results), "failures": failures}


def _table(title: str, header: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="left" if col == header[0] else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=300.0,
                    help="how long to keep attacking (every case runs at least once)")
    ap.add_argument("--agents", type=int, default=2, help="agent processes")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES),
                    help="attack families to replay (default: all)")
    ap.add_argument("--settle-s", type=float, default=12.0,
                    help="wait before the last measurement (the API's idle timeout is 10 s)")
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="edgeship-soak-"))
    env = SoakEnv(root, agents=args.agents)
    try:
        env.wait_fleet_http()
        env.wait_all_serving(env.release())
        time.sleep(2.0)  # let start-up allocations settle before the first measurement
        before = env.usage()
        warm: dict = {}

        def measure_warm() -> None:
            time.sleep(args.settle_s)  # idle API connections time out, answers drain
            warm.update(env.usage())

        started = time.monotonic()
        out = soak(env, args.duration_s, args.families, args.verbose, measure_warm)
        elapsed = time.monotonic() - started
        time.sleep(args.settle_s)
        after = env.usage()
    finally:
        env.close()
        if not args.keep:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
    rows = [[name, *out["results"].get(name, [0, 0, 0])] for name in args.families]
    totals = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    dead = (float("nan"), "dead")
    usage = [[name, f"{b[0]:.1f}", f"{warm.get(name, dead)[0]:.1f}",
              f"{after.get(name, dead)[0]:.1f}", b[1], warm.get(name, dead)[1],
              after.get(name, dead)[1]] for name, b in before.items()]
    if args.json:
        print(json.dumps({"elapsed_s": elapsed, "families": rows, "totals": totals,
                          "usage": usage, "failures": out["failures"]}))
    else:
        _table(f"soak: {elapsed:.0f} s, {args.agents} agents, locked-down broker",
               ["family", "cases run", "rejected cleanly", "failed"],
               rows + [["total", *totals]])
        _table("processes: at start / after one case of each family / at the end",
               ["process", "RSS MiB start", "RSS MiB warm", "RSS MiB end", "fds start",
                "fds warm", "fds end"], usage)
        for failure in out["failures"][:20]:
            print(f"FAILED {failure}")
    return 0 if totals[2] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
