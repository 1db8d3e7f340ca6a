"""`edgeship agent run --config X` without the top-level CLI's imports (converter, fleet):
the same ``agent.cli.cmd_run``, started fast for the kill tests."""

import argparse
import sys
from pathlib import Path

from edgeship.agent.cli import cmd_run

if __name__ == "__main__":
    sys.exit(cmd_run(argparse.Namespace(config=Path(sys.argv[1]), verbose=False)))
