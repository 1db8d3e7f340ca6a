"""The `edgeship` command as a whole: --version, -v anywhere, one error prefix, exit 2 for
bad input, and host commands on a device install (no torch, no rich, old Python) that say
what to install in one line instead of a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeship import cli
from edgeship.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("edgeship ")


@pytest.mark.parametrize("argv", [
    ["-v", "agent", "status", "--config", "{missing}"],
    ["agent", "-v", "status", "--config", "{missing}"],
    ["agent", "status", "--config", "{missing}", "--verbose"],
])
def test_verbose_before_or_after_the_subcommand(argv, tmp_path, capsys, caplog):
    argv = [a.format(missing=tmp_path / "none.toml") for a in argv]
    assert main(argv) == 2
    assert any(r.exc_info for r in caplog.records)  # --verbose: the traceback is logged
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("edgeship: error: config file ")


def test_without_verbose_an_error_is_one_line(tmp_path, capsys):
    assert main(["agent", "status", "--config", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeship: error: ")


def test_a_missing_repository_is_bad_input(tmp_path, capsys):
    (tmp_path / "bundle").mkdir()
    rc = main(["release", str(tmp_path / "bundle"), "--repo", str(tmp_path / "no-repo"),
               "--keys", str(tmp_path / "keys")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("edgeship: error: ") and "no-repo" in err[0]


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["demo", "--work-dir", str(tmp_path)]) == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def _device_install(*argv: str, hide: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`edgeship ARGV` in a Python where the modules in ``hide`` cannot be imported (a
    device install without the converter/fleet extras)."""
    code = ("import sys\n"
            f"for m in {hide!r}: sys.modules[m] = None\n"
            "from edgeship.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("argv, hide, extra", [
    (("convert", "digits", "--out", "{tmp}"), ("torch",), "converter"),
    (("fleet", "status", "--db", "{db}"), ("rich",), "fleet"),
    (("devices", "ls", "--db", "{db}"), ("sqlalchemy",), "fleet"),
])
def test_host_commands_on_a_device_install_name_the_extra(argv, hide, extra, tmp_path):
    db = tmp_path / "fleet.db"
    if "fleet" in argv:
        from edgeship.fleet.registry import Registry
        Registry(db).close()
    argv = tuple(a.format(tmp=tmp_path / "out", db=db) for a in argv)
    proc = _device_install(*argv, hide=hide)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    command = " ".join(argv[:2]) if argv[0] == "devices" else argv[0]
    assert lines[0].startswith(f"edgeship: error: 'edgeship {command}' needs {hide[0]}")
    assert f"pip install 'edgeship[{extra}]'" in lines[0]


def test_host_commands_on_an_old_python_say_which_python(monkeypatch, capsys):
    monkeypatch.setattr(cli, "HOST_PYTHON", (99, 0))
    assert main(["convert", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'edgeship convert' needs Python >= 99.0" in err[0]
    assert "pip install 'edgeship[converter]'" in err[0]
    assert main(["agent", "info", "--json"]) == 0  # the agent itself still runs


def test_each_convert_source_has_its_own_help(capsys):
    helps = {}
    for source in ("digits", "onnx", "torch"):
        with pytest.raises(SystemExit):
            main(["convert", source, "--help"])
        helps[source] = capsys.readouterr().out
    assert "--epochs" in helps["digits"] and "--calib DATA" not in helps["digits"]
    assert "MODEL.onnx" in helps["onnx"] and "--weights" not in helps["onnx"]
    assert "--weights" in helps["torch"] and "--input-shape" in helps["torch"]
