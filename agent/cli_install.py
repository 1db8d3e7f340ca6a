"""`edgeship agent install FILE`: a signed release archive (``edgeship release … --export``)
installed on a device with no broker, through the same TUF checks, lifecycle, health
check and rollback as an update over the network.

A running agent gets the archive over its Unix socket (copied into ``<state_dir>/inbox``
first, where the agent's user can read it) and installs it on its update worker; this
command follows the update record until the version is committed or refused. With no agent
running, the same steps run in this process (the trial window then sees no traffic).
Exit 0: the archive's version is active; 1: refused or rolled back (the reason code is the
one the fleet would get); 2: bad input (no such file, not an archive, bad config)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edgeship.agent.errors import ConfigError

#: how long past the health check and the trial window a hand-over is followed
FOLLOW_MARGIN_S = 300.0


def add_install_parser(asub: argparse._SubParsersAction) -> None:
    p = asub.add_parser("install", help="install a signed release archive (no broker needed)")
    p.add_argument("archive", type=Path, metavar="FILE",
                   help="from 'edgeship release … --export FILE' or 'edgeship fleet export'")
    p.add_argument("--config", required=True, type=Path, help="agent TOML config")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_install)


def cmd_install(args: argparse.Namespace) -> int:
    from edgeship.agent.client import live_status
    from edgeship.agent.config import load_config

    cfg = load_config(args.config)
    path = Path(args.archive).resolve()
    if not path.is_file():
        raise ConfigError(f"{args.archive}: no such file", key="archive")
    events: list[dict[str, Any]] = []

    def show(event: Any, fields: dict[str, Any]) -> None:
        events.append({"event": str(event), **fields})
        if not args.json:
            print(_event_text(str(event), fields), flush=True)

    if live_status(cfg) is not None:
        model, version = _hand_over(cfg, path, show)
    else:
        from edgeship.agent.daemon import Agent
        agent = Agent(cfg)
        agent.report_hooks.append(show)
        model, version = agent.install_archive_now(path)
    return _outcome(cfg, model, version, events, args.json)


def _event_text(event: str, fields: dict[str, Any]) -> str:
    what = f"{fields.get('model', '')} v{fields.get('version', '?')}".strip()
    extra = "".join(f" {k}={fields[k]}" for k in ("reason", "variant") if fields.get(k))
    detail = f" ({fields['detail']})" if fields.get("detail") else ""
    return f"{what}: {event}{extra}{detail}"


def _hand_over(cfg: Any, path: Path, show: Any) -> tuple[str, int]:
    """Give the archive to the running agent; follow its update record to the end."""
    from edgeship.agent.client import AgentClient
    from edgeship.agent.update.records import RecordStore

    sock = cfg.api_socket_path
    if sock is None or not sock.exists():
        raise ConfigError("the agent is running but has no Unix socket (api_socket = \"\"): "
                          "stop it and run 'edgeship agent install' again", key="api_socket")
    inbox = _copy_to_inbox(cfg.state_dir, path)
    started = time.time()
    with AgentClient(f"unix://{sock}", timeout_s=30.0) as client:
        doc = client.install_archive(str(inbox))
    model, version = str(doc["model"]), int(doc["version"])
    if doc.get("reason"):  # refused before any download (an older or a blocked version)
        show("rejected", {"model": model, "version": version, "reason": doc["reason"],
                          "detail": doc.get("detail")})
        return model, version
    if not doc.get("steps"):  # this version is already the active one
        return model, version
    records = RecordStore(cfg.updates_dir)
    deadline = time.monotonic() + cfg.health_timeout_s + cfg.trial_window_s + FOLLOW_MARGIN_S
    seen = ""
    while time.monotonic() < deadline:
        r = records.load(model)  # this attempt's record: updated since the hand-over
        if r.version == version and r.updated_at >= started - 1 and r.state.value != seen:
            seen = r.state.value
            show(seen, {"model": model, "version": version, "reason": r.reason})
            if seen in ("idle", "failed"):  # done (committed, then idle) or rolled back
                break
        elif not seen and _already_active(cfg, model, version):
            break  # done before this command saw any state of it
        time.sleep(0.5)
    return model, version


def _copy_to_inbox(state_dir: Path, path: Path) -> Path:
    """A copy the agent's user can read (its state directory; not /tmp: PrivateTmp)."""
    inbox = Path(state_dir) / "inbox"
    inbox.mkdir(mode=0o750, exist_ok=True)
    dest = inbox / path.name
    shutil.copyfile(path, dest)
    owner = Path(state_dir).stat()
    if os.geteuid() == 0:
        for p in (inbox, dest):
            os.chown(p, owner.st_uid, owner.st_gid)
    dest.chmod(0o640)
    return dest


def _already_active(cfg: Any, model: str, version: int) -> bool:
    from edgeship.agent.store import ModelStore

    active = ModelStore(cfg.models_dir).active(model)
    return active is not None and active.version == version


def _outcome(cfg: Any, model: str, version: int, events: list[dict[str, Any]],
             as_json: bool) -> int:
    """0 when the archive's version is active; else 1 with the reason code the fleet sees."""
    from edgeship.agent.store import ModelStore
    from edgeship.cliutil import error_line

    active = ModelStore(cfg.models_dir).active(model)
    ok = active is not None and active.version == version
    refusal = next((e for e in reversed(events) if e.get("reason")), None)
    doc = {"model": model, "version": version, "installed": ok,
           "active_version": active.version if active else None,
           "variant": active.variant.id if ok and active else None,
           "reason": None if ok or refusal is None else refusal["reason"],
           "events": events}
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    elif ok:
        print(f"{model} v{version} installed and active ({doc['variant']})")
    else:
        why = f"{refusal['reason']}" + (f": {refusal['detail']}" if refusal and
                                        refusal.get("detail") else "") if refusal else \
            "no update ran (see the agent's log)"
        error_line(f"{model} v{version} not installed ({why}); the device keeps "
                   f"{'v' + str(active.version) if active else 'no model'}")
    return 0 if ok else 1
