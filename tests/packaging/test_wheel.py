"""What a user installs: one top-level import package, ``edgeship``, and only product code."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("agent", "converter", "fleet", "devices", "edgeship")
#: names a product module must never import bare: they are repository folders, not packages
BARE = {"agent", "converter", "fleet", "devices", "bench", "tests"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in PRODUCT:  # edgeship/<name> are symlinks to the top-level folders
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    (path,) = out.glob("edgeship-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_exactly_one_top_level_package(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(
        (".dist-info", ".data"))}
    assert tops == {"edgeship"}
    top_level = [n for n in wheel.namelist() if n.endswith("top_level.txt")]
    if top_level:
        assert wheel.read(top_level[0]).decode().split() == ["edgeship"]


def test_the_wheel_carries_the_product_and_nothing_of_the_tests_or_benchmarks(wheel):
    names = set(wheel.namelist())
    for module in ("edgeship/agent/daemon.py", "edgeship/converter/cli.py",
                   "edgeship/fleet/server.py", "edgeship/devices/rpi4.toml",
                   "edgeship/fleet/web/dashboard.html", "edgeship/cli.py",
                   "edgeship/common/mqtt.py", "edgeship/agent/update/driver.py"):
        assert module in names, module
    assert not [n for n in names if "/tests/" in n or "/bench/" in n or n.startswith(
        ("tests/", "bench/")) or "fault" in n.rsplit("/", 1)[-1]]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_product_code_imports_the_edgeship_namespace_only():
    bad = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _imports(path):
                if module.split(".")[0] in BARE:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: import {module}")
    assert not bad, "\n".join(bad)


def test_the_wheel_carries_the_installer_and_the_unit(wheel):
    infos = {i.filename: i for i in wheel.infolist()}
    for name in ("edgeship/devices/install-agent", "edgeship/devices/edgeship-agent.service",
                 "edgeship/devices/rpi3-32.toml"):
        assert name in infos, name
    assert (infos["edgeship/devices/install-agent"].external_attr >> 16) & 0o111  # executable


def _requirements(wheel: zipfile.ZipFile) -> list:
    from packaging.requirements import Requirement

    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return [Requirement(line.split(":", 1)[1].strip())
            for line in wheel.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")]


def _installs(reqs: list, name: str, extra: str, **env: str) -> bool:
    from packaging.markers import default_environment

    environment = {**default_environment(), "extra": extra, **env}
    return any(r.name == name and (r.marker is None or r.marker.evaluate(environment))
               for r in reqs)


def test_no_runtime_is_forced_on_a_device(wheel):
    """`pip install edgeship` never touches an onnxruntime build the device already has
    (NVIDIA's onnxruntime-gpu on a Jetson is another distribution of the same module), and
    `edgeship[onnxruntime]` does not try onnxruntime on armv7l, where it has no wheel."""
    reqs = _requirements(wheel)
    for machine in ("x86_64", "aarch64", "armv7l"):
        assert not _installs(reqs, "onnxruntime", "", platform_machine=machine)
    assert _installs(reqs, "onnxruntime", "onnxruntime", platform_machine="aarch64")
    assert not _installs(reqs, "onnxruntime", "onnxruntime", platform_machine="armv7l")
    assert _installs(reqs, "tflite-runtime", "tflite-runtime", platform_machine="armv7l")
    # the host side stays out of a Python 3.9 device; tomli stands in for tomllib there
    assert not _installs(reqs, "torch", "converter", python_version="3.9")
    assert _installs(reqs, "torch", "converter", python_version="3.11")
    assert _installs(reqs, "tomli", "", python_version="3.9")
    assert not [r for r in reqs if r.name == "torch" and "==" in str(r.specifier)]


def test_provision_works_from_the_installed_wheel(wheel, tmp_path):
    """`edgeship provision` from site-packages (no source tree): the bundle gets the
    installer and the unit from the package."""
    site = tmp_path / "site-packages"
    wheel.extractall(site)
    work = tmp_path / "work"
    work.mkdir()

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=work,
                              env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=120)

    def edgeship(*args: str) -> subprocess.CompletedProcess:
        return python("-m", "edgeship", *args)

    where = python("-c", "import edgeship.fleet.provision as p; print(p.__file__)").stdout
    assert where.startswith(str(site)), where  # the wheel's copy, not the source tree

    assert edgeship("keys", "init", "--keys", "keys", "--repo", "repo").returncode == 0
    assert edgeship("broker", "ca-init", "--ca-dir", "ca").returncode == 0
    proc = edgeship("provision", "pi-0001", "--profile", "rpi3-32", "--broker",
                    "mqtts://b.example:8883", "--ca-dir", "ca", "--repo", "repo",
                    "--pip-spec", "/opt/edgeship-0.1.0-py3-none-any.whl")
    assert proc.returncode == 0, proc.stderr
    bundle = work / "enroll/pi-0001"
    assert (bundle / "install-agent").read_bytes() == \
        (site / "edgeship/devices/install-agent").read_bytes()
    assert (bundle / "edgeship-agent.service").is_file()
    assert sorted(p.name for p in (work / "enroll").iterdir()) == ["pi-0001"]
