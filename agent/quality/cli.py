"""`edgeship agent feedback` and `edgeship agent quality`: labels collected offline (a CSV
or JSON-lines file of request ids and true labels) posted to the local agent in batches,
and the agent's own view of a model's quality."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from edgeship.agent.quality.feedback import MAX_ITEMS
from edgeship.agent.quality.metrics import f1_ci, macro_note, share_ci
from edgeship.agent.quality.profile import ESTIMATE_METHODS
from edgeship.cliutil import EXIT_BAD_INPUT, fail


def add_parsers(asub: argparse._SubParsersAction) -> None:
    fb = asub.add_parser("feedback", help="post true labels for earlier predictions (a CSV "
                                          "with columns id,label or id,value, or JSON lines)")
    fb.add_argument("model")
    fb.add_argument("file", type=Path, help="labels file (.csv, .jsonl); - for stdin")
    _target(fb)
    fb.set_defaults(func=cmd_feedback)
    q = asub.add_parser("quality", help="a model's metrics from feedback, drift per signal "
                                        "and the label-free estimate, as the agent sees them")
    q.add_argument("model")
    _target(q)
    q.set_defaults(func=cmd_quality)


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="agent TOML config (finds its API socket)")
    p.add_argument("--api", help="the agent's API: unix:///path or http://host:port")
    p.add_argument("--json", action="store_true", help="print JSON")


def read_items(path: Path) -> Iterator[dict[str, Any]]:
    """Items from a CSV (header with id and label or value; labels that look like
    integers are class indexes, other text a class name) or JSON lines."""
    stream = sys.stdin if str(path) == "-" else open(path, newline="")
    with stream:
        first = stream.readline()
        if first.lstrip().startswith("{"):
            for n, line in enumerate([first, *stream], 1):
                if line.strip():
                    yield _json_line(line, n, path)
            return
        for row in csv.DictReader([first, *stream]):
            yield _csv_row(row, path)


def _json_line(line: str, n: int, path: Path) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    if not isinstance(item, dict):
        raise ValueError(f"{path}:{n}: each line must be a JSON object")
    return item


def _csv_row(row: dict[str, str], path: Path) -> dict[str, Any]:
    if "id" not in row or not ({"label", "value"} & set(row)):
        raise ValueError(f"{path}: the CSV needs an 'id' column and a 'label' or 'value' "
                         "column")
    if row.get("value") not in (None, ""):
        return {"id": row["id"], "value": float(row["value"])}
    label = row["label"].strip()
    return {"id": row["id"], "label": int(label) if label.lstrip("-").isdigit() else label}


def _url(args: argparse.Namespace) -> str:
    if args.api:
        return args.api
    if args.config is None:
        raise ValueError("give --config or --api")
    from edgeship.agent.config import load_config

    cfg = load_config(args.config)
    sock = cfg.api_socket_path
    return f"unix://{sock}" if sock and sock.exists() else \
        f"http://{cfg.api_host}:{cfg.api_port}"


def cmd_feedback(args: argparse.Namespace) -> int:
    from edgeship.agent.client import AgentClient

    try:
        items = list(read_items(args.file))
        url = _url(args)
    except (OSError, ValueError) as e:  # edgeship: error: …, exit 2
        return fail(e, EXIT_BAD_INPUT)
    tally: Counter[str] = Counter()
    problems: list[dict[str, Any]] = []
    try:
        with AgentClient(url) as client:
            for start in range(0, len(items), MAX_ITEMS):
                doc = client.feedback(args.model, items[start:start + MAX_ITEMS])
                for r in doc["results"]:
                    tally[r["status"]] += 1
                    if r["status"] not in ("accepted", "duplicate"):
                        problems.append(r)
    except OSError as e:  # no agent there: one line, exit 1
        return fail(e)
    if args.json:
        print(json.dumps({"items": len(items), **tally, "problems": problems[:100]}, indent=2))
    else:
        print(f"{len(items)} items: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
        for r in problems[:20]:
            print(f"  {r['id']}: {r['status']}: {r.get('message', '')}")
    return 0 if not problems else 1


def cmd_quality(args: argparse.Namespace) -> int:
    from edgeship.agent.client import AgentClient

    try:
        url = _url(args)
    except (OSError, ValueError) as e:  # edgeship: error: …, exit 2
        return fail(e, EXIT_BAD_INPUT)
    try:
        with AgentClient(url) as client:
            doc = client.quality(args.model)
    except OSError as e:
        return fail(e)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for line in describe(doc):
        print(line)
    return 0


def describe(doc: dict[str, Any]) -> list[str]:
    """Lines for a person: metrics with intervals, or why there are none; the estimate
    marked as one; the most drifted signals against chance."""
    lines = [f"version {doc['version']} ({doc['variant']}), reference profile: "
             f"{doc['profile']}"]
    for version, m in sorted(doc.get("metrics", {}).items()):
        if m.get("samples", 0) == 0:
            continue
        if "accuracy" in m:
            lines.append(f"v{version}: accuracy {share_ci(m, 'accuracy')}, macro precision "
                         f"{share_ci(m, 'precision_macro')}, macro recall {share_ci(m, 'recall_macro')}, "
                         f"macro F1 {f1_ci(m)}{macro_note(m)} from {m['samples']} labels")
        else:
            lines.append(f"v{version}: MAE {m['mae']:.4g}, RMSE {m['rmse']:.4g} from "
                         f"{m['samples']} labels")
    if not any(m.get("samples") for m in doc.get("metrics", {}).values()):
        lines.append("no labels yet: post feedback to measure accuracy")
    drift = doc.get("drift")
    if drift:
        est = drift.get("estimate") or {}
        if est.get("accuracy") is not None:
            method = ESTIMATE_METHODS.get(str(est.get("method")), est.get("method"))
            lines.append(f"estimated accuracy (an ESTIMATE, no labels; {method}): "
                         f"{est['accuracy']:.1%} over {est['samples']} samples")
        for name, s in list(drift["signals"].items())[:5]:
            lines.append(f"drift {name}: JS {s['js']} (chance {s['chance']})")
    return lines

