"""The one `edgeship` command. Subcommands register themselves; heavy imports are lazy so
`edgeship agent ...` on a device never loads torch, the converter or the fleet server.

Host commands (convert, keys, release, fleet, rollout, provision, broker, demo) need an
extra and Python >= 3.11; on a device install they stay listed and say, in one line, what to
install (exit 2) instead of failing with a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from edgeship.agent.errors import EdgeshipError
from edgeship.cliutil import EXIT_BAD_INPUT, error_line, exit_code

#: the Python the host side (converter, fleet server) is built and tested for
HOST_PYTHON = (3, 11)
#: module → (the top-level commands it registers, the extra they need). Each module has
#: ``add_parsers(subparsers)``.
COMMAND_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "edgeship.converter.cli": (("convert",), "converter"),
    "edgeship.fleet.cli": (("keys", "release", "fleet"), "fleet"),
    "edgeship.fleet.cli_rollout": (("rollout",), "fleet"),
    "edgeship.fleet.cli_provision": (("provision", "broker"), "fleet"),
    "edgeship.demo": (("demo",), "converter,fleet"),
}
#: modules that add subcommands under `edgeship devices` via ``add_device_commands(dsub)``
#: → (those subcommands, the extra they need): profiles/detect run on a device; ls/tag
#: read the fleet registry.
DEVICE_COMMAND_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "edgeship.devices.cli": (("profiles", "detect"), ""),
    "edgeship.fleet.cli_rollout": (("ls", "tag"), "fleet"),
}
#: packages of the PyTorch → TFLite extra (the rest of a host command's imports: its own extra)
TFLITE_CONVERT_MODULES = {"litert_torch", "ai_edge_torch", "ai_edge_quantizer", "transformers"}


def version() -> str:
    try:
        from importlib.metadata import version as dist_version
        return dist_version("edgeship")
    except Exception:  # a source tree that was never installed
        return "0+unknown"


def build_parser(unavailable: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``unavailable`` gets the commands that cannot run here, each with the
    one-line reason why."""
    parser = argparse.ArgumentParser(
        prog="edgeship",
        description="Convert models, sign releases, ship them over MQTT, serve them offline.")
    parser.add_argument("--version", action="version", version=f"edgeship {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from edgeship.agent.cli import add_parsers as agent_parsers
    agent_parsers(sub)
    unavailable = {} if unavailable is None else unavailable
    for module, (names, extra) in COMMAND_MODULES.items():
        mod = _import(module)
        if not isinstance(mod, str) and mod is not None:
            try:
                mod.add_parsers(sub)
                continue
            except ModuleNotFoundError as e:  # a lazy import while building its parser
                mod = f"needs {e.name}, which is not installed"
        if isinstance(mod, str):
            for name in names:
                unavailable[name] = f"'edgeship {name}' {mod}; pip install 'edgeship[{extra}]'"
                if name not in sub.choices:
                    sub.add_parser(name, help=f"(unavailable here: needs edgeship[{extra}])")
    _device_commands(sub, unavailable)
    _verbose_everywhere(parser)
    return parser


def _device_commands(sub: argparse._SubParsersAction, unavailable: dict[str, str]) -> None:
    """`edgeship devices ...`; a subcommand whose module cannot run here stays listed and
    is entered in ``unavailable`` as "devices NAME"."""
    p = sub.add_parser("devices", help="board profiles and the device registry")
    dsub = p.add_subparsers(dest="devices_cmd", required=True, metavar="COMMAND")
    for module, (names, extra) in DEVICE_COMMAND_MODULES.items():
        mod = _import(module)
        if isinstance(mod, str):
            for name in names:
                fix = f"pip install 'edgeship[{extra}]'" if extra else "reinstall edgeship"
                unavailable[f"devices {name}"] = f"'edgeship devices {name}' {mod}; {fix}"
                dsub.add_parser(name, help=f"(unavailable here: {fix})")
        elif mod is not None and hasattr(mod, "add_device_commands"):
            mod.add_device_commands(dsub)


def _import(module: str):
    """The module; None when it does not exist in this version; a reason (str) when it
    exists but cannot run here: an extra that is not installed, or too old a Python."""
    if module.split(".")[1] in ("converter", "fleet", "demo") and \
            sys.version_info < HOST_PYTHON:
        return (f"needs Python >= {'.'.join(map(str, HOST_PYTHON))} (this is "
                f"{sys.version.split()[0]})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(f"{e.name}."):
            return None
        return f"needs {e.name}, which is not installed"
    except ImportError as e:
        return f"cannot import {e.name or module} ({e})"


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` before or after any subcommand (a subcommand's copy only sets it
    when given, so ``edgeship -v agent status`` keeps it)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            if not any("--verbose" in a.option_strings for a in child._actions):
                child.add_argument("-v", "--verbose", action="store_true",
                                   default=argparse.SUPPRESS, help="debug logs, tracebacks")
            _verbose_everywhere(child)


def _command_names(argv: Sequence[str]) -> list[str]:
    """The subcommand and, for `devices`, its own subcommand ("devices ls")."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if not words:
        return []
    return [words[0], " ".join(words)] if words[0] == "devices" else [words[0]]


def _missing_extra(command: str, error: ImportError) -> int:
    extra = COMMAND_MODULES.get(_module_of(command), ((), ""))[1]
    if (error.name or "").split(".")[0] in TFLITE_CONVERT_MODULES:
        extra = "tflite-convert"
    if not extra:
        error_line(f"cannot import {error.name} ({error}): reinstall edgeship")
        return 1
    error_line(f"'edgeship {command}' needs {error.name}, which is not installed: "
               f"pip install 'edgeship[{extra}]'")
    return EXIT_BAD_INPUT


def _module_of(command: str) -> str:
    return next((m for m, (names, _) in COMMAND_MODULES.items() if command in names), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    unavailable: dict[str, str] = {}
    parser = build_parser(unavailable)
    for command in _command_names(argv):
        if command in unavailable:
            error_line(unavailable[command])
            return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EdgeshipError as e:
        if args.verbose:
            logging.exception("failed")
        error_line(f"{e} [{e.reason_code}]")
        return exit_code(e)
    except ImportError as e:
        if args.verbose:
            logging.exception("failed")
        return _missing_extra(args.command, e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
