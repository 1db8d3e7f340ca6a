"""The one `edgeship` command. Subcommands register themselves; heavy imports are lazy so
`edgeship agent ...` on a device never loads torch, the converter or the fleet server."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgeship.agent.errors import EdgeshipError

#: module → the top-level commands it registers (shown as unavailable when its extra is not
#: installed). Each module has ``add_parsers(subparsers)``.
COMMAND_MODULES: dict[str, list[str]] = {
    "edgeship.converter.cli": ["convert"],
    "edgeship.fleet.cli": ["keys", "release", "fleet"],
    "edgeship.fleet.cli_rollout": ["rollout"],
    "edgeship.fleet.cli_provision": ["provision", "broker"],
    "edgeship.demo": ["demo"],
}
#: modules that add subcommands under `edgeship devices` via ``add_device_commands(dsub)``
#: (profiles/detect run on a device; ls/tag read the fleet registry).
DEVICE_COMMAND_MODULES = ("edgeship.devices.cli", "edgeship.fleet.cli_rollout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeship",
        description="Convert models, sign releases, ship them over MQTT, serve them offline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from edgeship.agent.cli import add_parsers as agent_parsers
    agent_parsers(sub)
    for module, names in COMMAND_MODULES.items():
        mod = _import(module)
        if isinstance(mod, ImportError):
            _missing(sub, names, mod)
        elif mod is not None:
            mod.add_parsers(sub)
    _device_commands(sub)
    return parser


def _device_commands(sub: argparse._SubParsersAction) -> None:
    mods = [m for m in map(_import, DEVICE_COMMAND_MODULES)
            if m is not None and not isinstance(m, ImportError)
            and hasattr(m, "add_device_commands")]
    if not mods:
        return
    p = sub.add_parser("devices", help="board profiles and the device registry")
    dsub = p.add_subparsers(dest="devices_cmd", required=True, metavar="COMMAND")
    for mod in mods:
        mod.add_device_commands(dsub)


def _import(module: str):
    """The module; None when it does not exist in this version; the ImportError when it
    exists but needs an extra that is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(f"{e.name}."):
            return None
        return e
    except ImportError as e:
        return e


def _missing(sub: argparse._SubParsersAction, names: list[str], error: ImportError) -> None:
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
