"""What every ``edgeship`` subcommand shares: one error line and one exit-code rule.

Exit codes: 0 success, 1 failure, 2 bad usage or bad input (a bad flag value, a file or
directory that is missing or of the wrong kind, an invalid bundle, config or message).
"""

from __future__ import annotations

import logging
import sys

from edgeship.agent.errors import (BundleError, ConfigError, EdgeshipError,
                                   InferenceInputError, ProtocolError)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
PREFIX = "edgeship: error: "
#: errors that mean "what you gave me is wrong", not "it did not work"
BAD_INPUT_ERRORS = (ConfigError, BundleError, ProtocolError, InferenceInputError,
                    FileNotFoundError, NotADirectoryError, IsADirectoryError)

logger = logging.getLogger(__name__)


def error_line(message: object) -> None:
    """The one error line every command prints on stderr."""
    print(f"{PREFIX}{message}", file=sys.stderr)


def exit_code(error: BaseException) -> int:
    """2 for bad input (including errors that say so with ``bad_input = True``), else 1."""
    if isinstance(error, BAD_INPUT_ERRORS) or getattr(error, "bad_input", False):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def fail(error: BaseException, code: int | None = None) -> int:
    """Print ``error`` as one line (the traceback goes to the debug log: ``--verbose``)."""
    logger.debug("command failed", exc_info=error)
    error_line(error)
    return exit_code(error) if code is None else code


__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "EdgeshipError", "error_line",
           "exit_code", "fail"]
