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
