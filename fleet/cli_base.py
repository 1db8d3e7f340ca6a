"""What every fleet subcommand shares: exit codes and the wrapper that turns expected errors
into one stderr line and an exit code (0 ok, 1 failure, 2 bad input)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from typing import Callable

from edgeship.agent.errors import BundleError, ConfigError, EdgeshipError, ProtocolError
from edgeship.fleet.errors import ReleaseRejectedError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
_BAD_INPUT = (BundleError, ReleaseRejectedError, ConfigError, ProtocolError)


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected errors into one stderr line and an exit code."""
    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _BAD_INPUT as e:
            return _fail(e, EXIT_BAD_INPUT)
        except (EdgeshipError, OSError) as e:
            return _fail(e, EXIT_FAILURE)
    return wrapper


def _fail(e: Exception, code: int) -> int:
    logger.debug("command failed", exc_info=e)
    print(f"error: {e}", file=sys.stderr)
    return code


def _models_text(models: object) -> str:
    if isinstance(models, dict):
        return ", ".join(f"{k}:v{v.get('version', '?')}" if isinstance(v, dict) else f"{k}:v{v}"
                         for k, v in sorted(models.items()))
    if isinstance(models, list):
        return ", ".join(json.dumps(m, sort_keys=True) if not isinstance(m, str) else m
                         for m in models)
    return "" if models is None else str(models)
