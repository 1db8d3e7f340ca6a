"""`edgeship agent run --config X` for the kill tests: the same ``agent.cli.run_agent``,
started without the top-level CLI's imports (converter, fleet), with the test's fault plan
(``--fault SPEC``, see tests/install/faults.py) plugged into the install observer."""

import argparse
import sys
from pathlib import Path

from edgeship.agent.cli import configure_logging, run_agent
from edgeship.agent.config import load_config
from tests.install.faults import parse_fault_plan

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("config", type=Path)
    p.add_argument("--fault", default="")
    args = p.parse_args()
    cfg = load_config(args.config)
    configure_logging(cfg.log_level)
    sys.exit(run_agent(cfg, observer=parse_fault_plan(args.fault)))
