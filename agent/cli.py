"""`edgeship agent run|info|status`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeship.agent.config import AgentConfig
    from edgeship.agent.update.observer import InstallObserver

logger = logging.getLogger(__name__)

#: syslog priorities as sd-daemon(3) prefixes: journald stores them as the entry's PRIORITY.
_SD_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run and inspect the on-device agent")
    asub = p.add_subparsers(dest="agent_cmd", required=True, metavar="COMMAND")
    run = asub.add_parser("run", help="run the agent (MQTT session, updates, local API)")
    run.add_argument("--config", required=True, type=Path, help="agent TOML config")
    run.set_defaults(func=cmd_run)
    info = asub.add_parser("info", help="what this device is and what the agent would pick")
    info.add_argument("--profile", default=None,
                      help="device profile name or .toml (default: from --config, else "
                           "generic-<arch>)")
    info.add_argument("--config", type=Path, help="agent TOML config (profile, threads)")
    info.add_argument("--bundle", type=Path,
                      help="a bundle directory: also show which variant would be served")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    status = asub.add_parser("status", help="installed models, update records, telemetry "
                                            "queue, and the live agent if it runs")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)
    from edgeship.agent.quality.cli import add_parsers as add_quality_parsers
    add_quality_parsers(asub)
    from edgeship.agent.cli_install import add_install_parser
    add_install_parser(asub)


# --- run -------------------------------------------------------------------------------------

class _JournalFormatter(logging.Formatter):
    """``<6>agent.daemon: message``: journald reads the priority; no timestamp (it has one)."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SD_PRIORITY.get(record.levelno, 6)
        text = super().format(record).replace("\n", "\n    ")
        return f"<{prio}>{text}"


def configure_logging(level: str, *, journal: bool | None = None) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(_JournalFormatter("%(name)s [%(threadName)s]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def cmd_run(args: argparse.Namespace) -> int:
    from edgeship.agent.config import load_config

    cfg = load_config(args.config)  # a bad key fails here, before anything starts
    if not getattr(args, "verbose", False):
        configure_logging(cfg.log_level)
    return run_agent(cfg)


def run_agent(cfg: AgentConfig, observer: InstallObserver | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT. ``observer``: see
    ``agent.update.observer`` (tests plug their fault plans in; the product passes none)."""
    from edgeship.agent.daemon import Agent
    from edgeship.agent.update.observer import NO_OBSERVER

    agent = Agent(cfg, observer=observer or NO_OBSERVER)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    agent.start()
    urls = [a.url for a in (agent.api, agent.unix_api) if a is not None]
    where = " and ".join(urls) or "no local API"
    logger.info("edgeship agent %s serving on %s", cfg.device_id, where)
    print(f"edgeship agent {cfg.device_id} serving on {where}", flush=True)
    while not done.wait(1.0):  # a timed wait lets the signal handler run promptly
        pass
    agent.stop()
    return 0


# --- info ------------------------------------------------------------------------------------

def info_doc(profile_name: str, threads: int = 0, bundle: Path | None = None
             ) -> dict[str, Any]:
    from edgeship import devices
    from edgeship.agent.capabilities import detect, plan

    caps = detect()
    profile = devices.load_profile(profile_name)
    chosen = plan(caps, profile_providers=profile.execution_providers,
                  profile_runtimes=profile.runtimes,
                  profile_precisions=profile.preferred_precisions,
                  profile_threads=profile.threads, threads_override=threads)
    doc: dict[str, Any] = {"profile": profile.name, "found": caps.to_dict(),
                           "plan": chosen.to_dict()}
    if caps.arch != profile.arch:
        doc["warning"] = f"profile {profile.name} is for {profile.arch}, this is {caps.arch}"
    if bundle is not None:
        doc["bundle"] = _bundle_pick(bundle, chosen, profile.arch, profile.uses_measurements)
    return doc


def _bundle_pick(bundle: Path, chosen: Any, arch: str,
                 use_measurements: bool = False) -> dict[str, Any]:
    from edgeship.agent.errors import ConfigError, EdgeshipError
    from edgeship.agent.manifest import MANIFEST_NAME, Manifest
    from edgeship.agent.selection import select_variant

    try:
        manifest = Manifest.from_bytes((bundle / MANIFEST_NAME).read_bytes())
    except OSError as e:
        raise ConfigError(f"no {MANIFEST_NAME} in {bundle}: {e.strerror}",
                          key="bundle") from e
    try:
        v = select_variant(manifest, chosen.precisions, chosen.runtimes, arch,
                           use_measurements=use_measurements)
    except EdgeshipError as e:
        return {"model": manifest.model, "version": manifest.version, "variant": None,
                "reason": str(e)}
    return {"model": manifest.model, "version": manifest.version, "variant": v.id,
            "runtime": v.runtime, "precision": v.precision, "threads": chosen.threads,
            "providers": list(chosen.providers) if v.runtime == "onnxruntime" else []}


def _default_profile() -> str:
    from edgeship.agent.capabilities import machine
    return {"aarch64": "generic-arm64", "arm64": "generic-arm64",
            "armv7l": "generic-armv7l"}.get(machine(), "generic-x86_64")


def cmd_info(args: argparse.Namespace) -> int:
    threads = 0
    profile = args.profile
    if args.config is not None:
        from edgeship.agent.config import load_config
        cfg = load_config(args.config)
        threads, profile = cfg.threads, profile or cfg.profile
    doc = info_doc(profile or _default_profile(), threads, args.bundle)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    found, chosen = doc["found"], doc["plan"]
    rows = [("profile", doc["profile"]), ("arch", found["arch"]),
            ("cpu", found["cpu_model"] or "?"), ("cores", found["cores"]),
            ("ram", f"{found['ram_mb']} MB"),
            ("cpu features", " ".join(found["cpu_features"]) or "-"),
            ("gpu", found["gpu"] or "none"),
            ("onnx providers", ", ".join(found["onnx_providers"])),
            ("runtimes", ", ".join(found["runtimes"]) or "none"),
            ("numpy", found["numpy_version"]),
            ("-> providers", ", ".join(chosen["providers"])),
            ("-> precisions", " > ".join(chosen["precisions"])),
            ("-> threads", chosen["threads"])]
    rows += [("-> note", n) for n in chosen["notes"]]
    if "bundle" in doc:
        b = doc["bundle"]
        rows.append(("-> variant", f"{b['model']} v{b['version']}: "
                                   f"{b['variant'] or 'none (' + b['reason'] + ')'}"))
    if "warning" in doc:
        rows.append(("warning", doc["warning"]))
    for key, value in rows:
        print(f"{key:16} {value}")
    return 0


# --- status ----------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    from edgeship.agent.client import live_status
    from edgeship.agent.config import load_config
    from edgeship.agent.update.records import RecordStore
    from edgeship.agent.store import ModelStore

    cfg = load_config(args.config)
    store = ModelStore(cfg.models_dir)
    models = {}
    for name in store.models():
        active = store.active(name)
        if active:
            models[name] = {"version": active.version, "variant": active.variant.id}
    records = {r.model: {"state": r.state.value, "version": r.version, "reason": r.reason}
               for r in RecordStore(cfg.updates_dir).all()}
    doc = {"device": cfg.device_id, "models": models, "updates": records,
           "telemetry": _spool_status(cfg), "live": live_status(cfg)}
    _emit(doc, args.json)
    return 0


def _spool_status(cfg: Any) -> dict[str, Any] | None:
    from edgeship.agent.spool import SpoolSettings, TelemetrySpool

    if not cfg.spool_path.exists():
        return None
    spool = TelemetrySpool(SpoolSettings(cfg.spool_path))
    try:
        return spool.stats().to_dict()
    finally:
        spool.close()


def _emit(doc: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    for key, value in status_rows(doc):
        print(f"{key:12} {value}")


def status_rows(doc: dict[str, Any], now: float | None = None) -> list[tuple[str, str]]:
    """``agent status`` as label/value rows a person reads (``--json`` has everything)."""
    import time

    now = time.time() if now is None else now
    live = doc.get("live")
    rows = [("device", doc["device"])]
    if live is None:
        rows.append(("agent", "not running (no answer on its local API)"))
    else:
        health = live.get("health") or {}
        rows.append(("agent", f"running, {health.get('status', '?')}, API {live['url']}"))
        rows.append(("mqtt", _mqtt_text(health.get("mqtt"), now)))
    serving = (live or {}).get("serving") or {}
    for name, m in sorted(doc["models"].items()):
        state = "serving" if serving.get(name) == m["version"] else "installed"
        rows.append(("model", f"{name} v{m['version']} {m['variant']} ({state})"))
    if not doc["models"]:
        rows.append(("model", "none installed"))
    for name, r in sorted(doc["updates"].items()):
        reason = f": {r['reason']}" if r.get("reason") else ""
        rows.append(("update", f"{name} v{r['version']} {r['state']}{reason}"))
    t = doc.get("telemetry")
    rows.append(("telemetry", "no spool yet" if t is None else
                 f"{t['queued']} queued, {t['dead_letters']} dead letters, "
                 f"{t['evicted']} evicted, {t['acked']} sent"))
    return rows


def _mqtt_text(mqtt: dict[str, Any] | None, now: float) -> str:
    """``{"state", "url", "last_contact", "next_retry_at", "error"}`` from /healthz."""
    if not mqtt:
        return "unknown (this agent does not report it)"
    text = f"{mqtt.get('state', '?')} ({mqtt.get('url', '?')})"
    last = mqtt.get("last_contact")
    text += "; never reached" if last is None else f"; last contact {_ago(now - last)} ago"
    if mqtt.get("error"):
        text += f"; last error: {mqtt['error']}"
    if mqtt.get("next_retry_at"):
        text += f"; next try in {max(0.0, mqtt['next_retry_at'] - now):.0f} s"
    return text


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
