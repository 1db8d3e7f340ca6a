"""Latency budgets belong to the release: one set at convert time refuses the install on a
device with a reason that `fleet status` (table and --json) shows; one set at release time
replaces it."""

from __future__ import annotations

import argparse
import json

import pytest

from edgeship.fleet.cli import add_parsers
from edgeship.fleet.registry import Registry
from tests.support import wait_until
from tests.zoo.conftest import run_convert

pytestmark = pytest.mark.timeout(600)


def _fleet_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="edgeship")
    add_parsers(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def _convert(fixed1, out, version: int, capsys) -> str:
    code, result, err = run_convert(
        ["onnx", str(fixed1.path), "--calib", str(fixed1.data), "--variants", "onnx-fp32",
         "--latency-budget-ms", "0.001", "--version", str(version), "--out", str(out),
         "--no-tar"], capsys)
    assert code == 0, err
    return result["bundle_dir"]


def test_release_budget_refuses_with_a_reason_fleet_status_shows(fleet, fixed1, tmp_path,
                                                                capsys):
    fleet.start_agent("pi-slow", profile="rpi4", trial_window_s=1.0)
    bundle = _convert(fixed1, tmp_path, 1, capsys)
    assert _fleet_cli("release", bundle, "--repo", fleet.repo, "--keys", fleet.keys) == 0
    fleet.announce("fixed1", 1)
    failed = fleet.wait_failed("pi-slow", 1, timeout_s=120)
    assert failed["reason"] == "latency_budget_exceeded"
    assert failed["detail"].endswith("ms > 0.0 ms (the release's budget)")
    db = fleet.root / "fleet.db"
    wait_until(lambda: any(d.id == "pi-slow" and d.last_failure_detail for d in
                           Registry(db).devices()), 30, "the registry to record it")
    capsys.readouterr()
    assert _fleet_cli("fleet", "status", "--db", db, "--json") == 0
    (row,) = [d for d in json.loads(capsys.readouterr().out) if d["id"] == "pi-slow"]
    assert row["last_failure"] == "latency_budget_exceeded"
    assert row["last_failure_detail"].endswith("ms > 0.0 ms (the release's budget)")
    assert _fleet_cli("fleet", "status", "--db", db) == 0
    assert "latency_budget_exceeded" in capsys.readouterr().out

    bundle = _convert(fixed1, tmp_path / "v2", 2, capsys)  # the same tiny budget, but...
    assert _fleet_cli("release", bundle, "--repo", fleet.repo, "--keys", fleet.keys,
                      "--latency-budget-ms", "5000") == 0  # ...the release sets its own
    fleet.announce("fixed1", 2)
    fleet.wait_serving("pi-slow", 2, timeout_s=120)
