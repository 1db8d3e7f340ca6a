"""What every fleet subcommand shares: exit codes and the wrapper that turns expected errors
into one stderr line and an exit code (0 ok, 1 failure, 2 bad input)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
from typing import Callable

from edgeship.agent.errors import EdgeshipError
from edgeship.cliutil import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, fail

logger = logging.getLogger(__name__)
__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_OK", "_command", "_models_text"]


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected errors into one stderr line and an exit code."""
    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (EdgeshipError, OSError) as e:  # edgeship: error: …, exit 2 for bad input
            return fail(e)
    return wrapper


def _models_text(models: object) -> str:
    if isinstance(models, dict):
        return ", ".join(f"{k}:v{v.get('version', '?')}" if isinstance(v, dict) else f"{k}:v{v}"
                         for k, v in sorted(models.items()))
    if isinstance(models, list):
        return ", ".join(json.dumps(m, sort_keys=True) if not isinstance(m, str) else m
                         for m in models)
    return "" if models is None else str(models)
