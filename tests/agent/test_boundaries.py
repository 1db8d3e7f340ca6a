"""The agent must install and run on a device without torch, the converter or the fleet."""

import subprocess
import sys


def test_importing_the_agent_pulls_in_no_torch_converter_or_fleet():
    code = ("import sys, edgeship.agent, edgeship.agent.daemon, edgeship.agent.cli,"
            " edgeship.agent.api, edgeship.agent.update.download\n"
            "bad = [m for m in ('torch', 'edgeship.converter', 'edgeship.fleet', 'sklearn', 'onnx')"
            " if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"agent imported {out.stdout.strip()}"


def test_agent_cli_help_runs_without_host_extras():
    out = subprocess.run([sys.executable, "-m", "edgeship", "agent", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert "run" in out.stdout and "info" in out.stdout
