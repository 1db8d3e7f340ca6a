"""`edgeship agent run|info|status`."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import sys
import threading
from pathlib import Path

from agent.errors import EdgeshipError

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run and inspect the on-device agent")
    asub = p.add_subparsers(dest="agent_cmd", required=True, metavar="COMMAND")
    run = asub.add_parser("run", help="run the agent (MQTT session, updates, local API)")
    run.add_argument("--config", required=True, type=Path, help="agent TOML config")
    run.set_defaults(func=cmd_run)
    info = asub.add_parser("info", help="what this device is and which variant it would pick")
    info.add_argument("--profile", default="generic-x86_64", help="device profile name")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    status = asub.add_parser("status", help="installed models and update records")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.daemon import Agent

    cfg = load_config(args.config)
    agent = Agent(cfg)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    agent.start()
    print(f"edgeship agent {cfg.device_id} serving on {agent.api.url}", flush=True)
    done.wait()
    agent.stop()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import devices
    from agent.runtime import available_onnx_providers

    profile = devices.load_profile(args.profile)
    info = {"machine": platform.machine(), "python": platform.python_version(),
            "profile": profile.name, "profile_arch": profile.arch,
            "onnxruntime_providers": available_onnx_providers(),
            "preferred_precisions": list(profile.preferred_precisions),
            "threads": profile.threads}
    _emit(info, args.json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.lifecycle import RecordStore
    from agent.store import ModelStore

    cfg = load_config(args.config)
    store = ModelStore(cfg.models_dir)
    models = {}
    for name in store.models():
        active = store.active(name)
        if active:
            models[name] = {"version": active.version, "variant": active.variant.id}
    records = {r.model: {"state": r.state.value, "version": r.version, "reason": r.reason}
               for r in RecordStore(cfg.updates_dir).all()}
    _emit({"device": cfg.device_id, "models": models, "updates": records}, args.json)
    return 0


def _emit(doc: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    for key, value in doc.items():
        print(f"{key:24} {value}")
