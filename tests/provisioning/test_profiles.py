"""Board profiles: every shipped profile validates, and bad ones fail naming file and key."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from edgeship import devices
from edgeship.agent.errors import ConfigError
from edgeship.cli import main
from edgeship.common.compat import tomllib

REQUIRED_BOARDS = {"rpi-zero-2w", "rpi3b-plus", "rpi4", "rpi5", "jetson-nano",
                   "jetson-orin-nano", "generic-x86_64", "generic-arm64",
                   "rpi-zero-2w-32", "rpi3-32", "generic-armv7l"}


def _raw(name: str) -> dict:
    return tomllib.loads((resources.files("edgeship.devices") / f"{name}.toml").read_text())


def test_all_required_boards_have_valid_profiles():
    assert REQUIRED_BOARDS <= set(devices.profile_names())
    for p in devices.load_all():
        assert p.threads <= p.cores and p.model_memory_budget_mb < p.ram_mb
        assert p.thermal_throttle_c < p.thermal_limit_c
        assert "CPUExecutionProvider" in p.execution_providers


def test_32_bit_pi_profiles_run_tflite_only():
    """onnxruntime has no armv7l build: these profiles must not ask for it."""
    armv7 = [p for p in devices.load_all() if p.arch == "armv7l"]
    assert {p.name for p in armv7} == {"rpi-zero-2w-32", "rpi3-32", "generic-armv7l"}
    for p in armv7:
        assert p.runtimes == ("litert",), p.name


def test_jetsons_prefer_fp16_and_list_gpu_providers_before_cpu():
    for name in ("jetson-nano", "jetson-orin-nano"):
        p = devices.load_profile(name)
        assert p.preferred_precisions[0] == "fp16"
        assert p.execution_providers[-1] == "CPUExecutionProvider"
        assert "CUDAExecutionProvider" in p.execution_providers


@pytest.mark.parametrize("mutate, key, words", [
    (lambda r: r.pop("threads"), "threads", "missing required key 'threads'"),
    (lambda r: r.update(threads=16), "threads", "must be <= cores"),
    (lambda r: r.update(cores="four"), "cores", "must be a integer"),
    (lambda r: r.update(arch="mips"), "arch", "must be one of"),
    (lambda r: r.update(preferred_precisions=["int2"]), "preferred_precisions", "'int2'"),
    (lambda r: r.update(execution_providers=["CUDAExecutionProvider"]),
     "execution_providers", "must include CPUExecutionProvider"),
    (lambda r: r.update(model_memory_budget_mb=9000), "model_memory_budget_mb", "< ram_mb"),
    (lambda r: r.update(thermal_throttle_c=99.0), "thermal_throttle_c", "< thermal_limit_c"),
    (lambda r: r.update(colour="red"), "colour", "unknown key 'colour'"),
    (lambda r: r.update(thread=4), "thread", "unknown key 'thread' (did you mean 'threads'?)"),
    (lambda r: r["gates"].update(min_agreement=1.5), "gates.min_agreement", "<= 1"),
    (lambda r: r["gates"].pop("max_accuracy_drop_points"), "gates.max_accuracy_drop_points",
     "missing"),
    (lambda r: r["detect"].update(models="Pi"), "detect.models", "must be a list"),
    (lambda r: r.update(latency_budget_ms=True), "latency_budget_ms", "must be a number"),
])
def test_bad_profile_is_rejected_naming_file_and_key(mutate, key, words):
    raw = _raw("rpi4")
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        devices.parse_profile(raw, source="devices/rpi4.toml")
    assert e.value.key == key
    assert str(e.value).startswith("devices/rpi4.toml:") and words in str(e.value)


def test_profile_file_name_must_match_its_name(tmp_path):
    text = (resources.files("edgeship.devices") / "rpi4.toml").read_text()
    path = tmp_path / "my-board.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="my-board.toml: key 'name' must match"):
        devices.load_profile(str(path))
    path.write_text(text.replace('name = "rpi4"', 'name = "my-board"'))
    assert devices.load_profile(str(path)).name == "my-board"


def test_cli_profiles_table_and_json(capsys):
    assert main(["devices", "profiles"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED_BOARDS:
        assert name in out
    assert main(["devices", "profiles", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {p["name"]: p for p in doc}
    assert by_name["rpi-zero-2w"]["model_memory_budget_mb"] == 96
    assert by_name["jetson-nano"]["gates"]["min_agreement"] == 0.97


def test_cli_profiles_check_reports_bad_custom_profile(tmp_path, capsys):
    path = tmp_path / "x.toml"
    path.write_text('name = "x"\n')
    assert main(["devices", "profiles", "--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "x.toml: missing required key 'description'" in err


def test_health_check_budget_is_sane_for_every_profile():
    """The agent rejects a model whose median latency exceeds the budget; the budget must
    leave room for a small CNN (digits runs well under 1 ms on x86) yet catch a model that is
    clearly too big for the board."""
    for p in devices.load_all():
        assert 5.0 <= p.latency_budget_ms <= 100.0, p.name


def test_devices_package_imports_nothing_from_the_host_side():
    import subprocess
    import sys

    code = ("import sys, edgeship.devices, edgeship.devices.cli, edgeship.devices.detect\n"
            "print(','.join(m for m in ('torch', 'edgeship.converter', 'edgeship.fleet', 'rich',"
            " 'sklearn')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
