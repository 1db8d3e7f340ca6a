from __future__ import annotations

import argparse
import json

from edgeship.converter import cli
from edgeship.converter.bundle import read_bundle_dir


def _parse(argv):
    parser = argparse.ArgumentParser(prog="edgeship")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_convert_digits_json_writes_bundle_and_tar(tmp_path, capsys):
    args = _parse(["convert", "digits", "--out", str(tmp_path), "--version", "7",
                   "--epochs", "10", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["shipped"] == ["onnx-fp32", "onnx-int8"]
    manifest = read_bundle_dir(result["bundle_dir"])
    assert manifest.version == 7 and result["tar"].endswith("digits-v7.tar")


def test_existing_output_is_bad_input_with_one_line(tmp_path, capsys):
    (tmp_path / "digits-v1").mkdir()
    args = _parse(["convert", "digits", "--out", str(tmp_path), "--version", "1"])
    assert cli.run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "digits-v1 already exists" in err[0]


def test_bad_version_is_bad_input(tmp_path, capsys):
    args = _parse(["convert", "digits", "--out", str(tmp_path), "--version", "0"])
    assert cli.run(args) == 2
    assert "--version" in capsys.readouterr().err


def test_impossible_gate_exits_1_and_writes_nothing(tmp_path, capsys):
    args = _parse(["convert", "digits", "--out", str(tmp_path), "--epochs", "3",
                   "--max-size-kb", "1",
                   "--json", "--no-tar"])
    assert cli.run(args) == 1
    payload = json.loads(capsys.readouterr().out)
    assert not payload["ok"] and set(payload["failures"]) == {"onnx-fp32", "onnx-int8"}
    assert list(tmp_path.iterdir()) == []
