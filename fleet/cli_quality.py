"""``edgeship fleet quality``: per version of a model, accuracy, precision, recall and F1
from feedback (with sample counts and 95 % intervals, or "too few labels"), the drift of
the inputs and outputs (Jensen–Shannon distance with its chance level) and the label-free
accuracy estimate (marked as one), pooled over the devices of a cohort (group, tag,
profile). Reads the registry directly, like ``fleet status``; errors are one line (exit 2
for bad input)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeship.agent.errors import ConfigError
from edgeship.fleet.cli_base import _command
from edgeship.fleet.db import is_url
from edgeship.fleet.quality import MIN_LABELLED, table_rows
from edgeship.fleet.quality_store import quality_doc
from edgeship.fleet.registry import Registry


def add_parsers(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quality", help="model quality per version: metrics from feedback, "
                                       "drift, estimated accuracy")
    q.add_argument("model")
    q.add_argument("--db", required=True, help="registry: SQLite file or postgresql:// URL")
    q.add_argument("--group", help="only devices of this group")
    q.add_argument("--tag", help="only devices with this tag")
    q.add_argument("--profile", help="only devices of this board profile")
    q.add_argument("--since-s", type=float, default=3600.0,
                   help="drift windows reported in the last this many seconds (3600)")
    q.add_argument("--min-labels", type=int, default=MIN_LABELLED,
                   help=f"fewer labels than this: no metric is shown ({MIN_LABELLED})")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_quality)


@_command
def cmd_quality(args: argparse.Namespace) -> int:
    if not is_url(args.db) and not Path(args.db).is_file():
        raise ConfigError(f"no registry at {args.db}", key="db")
    registry = Registry(args.db if is_url(args.db) else Path(args.db))
    try:
        doc = quality_doc(registry, args.model, group=args.group, tag=args.tag,
                          profile=args.profile, since_s=args.since_s,
                          min_labelled=args.min_labels)
    finally:
        registry.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = table_rows(doc)
    if not rows:
        print(f"no quality reports for {args.model}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model}: quality per version")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)
    return 0
