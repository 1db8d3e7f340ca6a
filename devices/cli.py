"""`edgeship devices profiles` and `edgeship devices detect`: run on a device (no fleet, no
torch, no rich)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from edgeship import devices
from edgeship.agent.errors import ConfigError
from edgeship.devices.detect import detect, read_host_facts

_COLUMNS = (("name", "profile"), ("arch", "arch"), ("cores", "cores"), ("ram_mb", "RAM MB"),
            ("threads", "threads"), ("model_memory_budget_mb", "model MB"),
            ("latency_budget_ms", "latency ms"), ("thermal", "throttle/limit C"),
            ("preferred_precisions", "variants (preferred first)"),
            ("execution_providers", "execution providers"))


def add_device_commands(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("profiles", help="list the board profiles (devices/*.toml)")
    p.add_argument("--json", action="store_true", help="print every field as JSON")
    p.add_argument("--check", metavar="FILE", type=Path,
                   help="validate a custom profile TOML file instead")
    p.set_defaults(func=cmd_profiles)
    d = dsub.add_parser("detect", help="which profile this board matches, and why")
    d.add_argument("--root", type=Path, default=Path("/"),
                   help="read /proc and /etc under this directory (for images and tests)")
    d.add_argument("--arch", help="override the architecture (default: uname -m)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_detect)


def profile_dict(p: devices.Profile) -> dict:
    return dataclasses.asdict(p)


def cmd_profiles(args: argparse.Namespace) -> int:
    try:
        profiles = [devices.load_profile(str(args.check))] if args.check else devices.load_all()
    except ConfigError as e:
        print(f"edgeship: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([profile_dict(p) for p in profiles], indent=2))
        return 0
    rows = [[_cell(p, key) for key, _ in _COLUMNS] for p in profiles]
    _print_table([title for _, title in _COLUMNS], rows)
    if args.check:
        print(f"{args.check}: valid")
    return 0


def _cell(p: devices.Profile, key: str) -> str:
    if key == "thermal":
        return f"{p.thermal_throttle_c:g}/{p.thermal_limit_c:g}"
    value = getattr(p, key)
    if isinstance(value, tuple):
        return ",".join(v.replace("ExecutionProvider", "") for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_detect(args: argparse.Namespace) -> int:
    facts = read_host_facts(args.root, arch=args.arch)
    found = detect(facts, devices.load_all())
    if found is None:
        msg = f"no profile for architecture {facts.arch!r} (known: " \
              f"{', '.join(sorted({p.arch for p in devices.load_all()}))})"
        if args.json:
            print(json.dumps({"profile": None, "error": msg}))
        else:
            print(f"edgeship: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
        return 0
    print(f"profile: {found.profile}")
    for r in found.reasons:
        print(f"  because {r}")
    for w in found.warnings:
        print(f"  warning: {w}")
    print(f"use it: profile = \"{found.profile}\" in the agent config, or "
          f"`edgeship provision DEVICE_ID --profile {found.profile}`")
    return 0
