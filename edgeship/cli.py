"""The one `edgeship` command. Subcommands register themselves; heavy imports are lazy so
`edgeship agent ...` on a device never loads torch, the converter or the fleet server."""

from __future__ import annotations

import argparse
import logging
import sys

from agent.errors import EdgeshipError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeship",
        description="Convert models, sign releases, ship them over MQTT, serve them offline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from agent.cli import add_parsers as agent_parsers
    agent_parsers(sub)
    for module in ("converter.cli", "fleet.cli", "edgeship.demo"):
        try:
            mod = __import__(module, fromlist=["add_parsers"])
        except ImportError as e:  # extra not installed (e.g. on a device)
            _missing(sub, module, e)
            continue
        (getattr(mod, "add_parsers", None) or getattr(mod, "add_parser"))(sub)
    return parser


def _missing(sub: argparse._SubParsersAction, module: str, error: ImportError) -> None:
    names = {"converter.cli": ["convert"], "fleet.cli": ["keys", "release", "fleet"],
             "edgeship.demo": ["demo"]}[module]
    for name in names:
        p = sub.add_parser(name, help=f"(unavailable: {error.name} is not installed)")
        p.set_defaults(func=lambda args, e=error: _fail_missing(e))


def _fail_missing(error: ImportError) -> int:
    print(f"edgeship: this command needs an extra that is not installed ({error}); "
          "pip install 'edgeship[converter,fleet]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgeshipError as e:
        if args.verbose:
            logging.exception("failed")
        print(f"edgeship: error: {e} [{e.reason_code}]", file=sys.stderr)
        return 2 if e.reason_code in ("config_invalid", "bad_request") else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
