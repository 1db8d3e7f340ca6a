"""`edgeship devices detect` on fixture file trees copied from real boards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship import devices
from edgeship.devices.detect import HostFacts, detect, read_host_facts
from edgeship.cli import main

PI_FEATURES = "fp asimd evtstrm crc32 cpuid"
# a Cortex-A53 running 32-bit Raspberry Pi OS (armv7l)
ARMV7_FEATURES = "half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 " \
                 "lpae evtstrm crc32"
A76_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid " \
               "asimdrdm lrcpc dcpop asimddp"


def _cpuinfo(n: int, features: str, model: str | None = None) -> str:
    cpus = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
                   f"CPU implementer\t: 0x41\n\n" for i in range(n))
    return cpus + (f"Hardware\t: BCM2835\nModel\t\t: {model}\n" if model else "")


BOARDS = {
    # name: (arch, device-tree model, nv_tegra_release, cpuinfo, MemTotal kB, expected)
    "pi-zero-2w": ("aarch64", "Raspberry Pi Zero 2 W Rev 1.0", None,
                   _cpuinfo(4, PI_FEATURES), 441_000, "rpi-zero-2w"),
    "pi-3b-plus": ("aarch64", "Raspberry Pi 3 Model B Plus Rev 1.3", None,
                   _cpuinfo(4, PI_FEATURES), 944_000, "rpi3b-plus"),
    # the same boards on 32-bit Pi OS: TFLite profiles, never the onnxruntime ones
    "pi-zero-2w-32bit": ("armv7l", "Raspberry Pi Zero 2 W Rev 1.0", None,
                         _cpuinfo(4, ARMV7_FEATURES), 441_000, "rpi-zero-2w-32"),
    "pi-3b-plus-32bit": ("armv7l", "Raspberry Pi 3 Model B Plus Rev 1.3", None,
                         _cpuinfo(4, ARMV7_FEATURES), 944_000, "rpi3-32"),
    "pi-3b-32bit": ("armv7l", "Raspberry Pi 3 Model B Rev 1.2", None,
                    _cpuinfo(4, ARMV7_FEATURES), 944_000, "rpi3-32"),
    "armv7-other": ("armv7l", "Some Cortex-A7 board", None, _cpuinfo(4, ARMV7_FEATURES),
                    1_000_000, "generic-armv7l"),
    "pi-4": ("aarch64", "Raspberry Pi 4 Model B Rev 1.4", None,
             _cpuinfo(4, PI_FEATURES), 3_884_000, "rpi4"),
    "pi-400": ("aarch64", "Raspberry Pi 400 Rev 1.0", None,
               _cpuinfo(4, PI_FEATURES), 3_884_000, "rpi4"),
    "pi-5": ("aarch64", "Raspberry Pi 5 Model B Rev 1.0", None,
             _cpuinfo(4, A76_FEATURES), 8_245_000, "rpi5"),
    "jetson-nano": ("aarch64", "NVIDIA Jetson Nano Developer Kit",
                    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, "
                    "EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n",
                    _cpuinfo(4, PI_FEATURES), 4_051_000, "jetson-nano"),
    "jetson-orin-nano": ("aarch64", "NVIDIA Jetson Orin Nano Developer Kit",
                         "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, "
                         "EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024\n",
                         _cpuinfo(6, A76_FEATURES + " i8mm"), 7_620_000, "jetson-orin-nano"),
    # a Jetson container image: no device tree, only the L4T release file
    "orin-container": ("aarch64", None, "# R35 (release), REVISION: 4.1\n",
                       _cpuinfo(6, A76_FEATURES), 7_620_000, "jetson-orin-nano"),
    # an older Pi kernel in a container: no device tree, the model is in cpuinfo
    "pi4-no-dt": ("aarch64", None, None, _cpuinfo(4, PI_FEATURES,
                                                  "Raspberry Pi 4 Model B Rev 1.2"),
                  1_900_000, "rpi4"),
    "rock-pi": ("aarch64", "Radxa ROCK 5B", None, _cpuinfo(8, A76_FEATURES), 16_000_000,
                "generic-arm64"),
    "x86-nuc": ("x86_64", None, None,
                "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2\n\n"
                "processor\t: 1\nflags\t\t: fpu sse4_2 avx avx2\n\n", 16_000_000,
                "generic-x86_64"),
}


def make_root(tmp: Path, arch, model, tegra, cpuinfo, mem_kb) -> Path:
    (tmp / "proc").mkdir(parents=True)
    (tmp / "arch").write_text(arch + "\n")
    (tmp / "proc/cpuinfo").write_text(cpuinfo)
    (tmp / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree: 1 kB\n")
    if model is not None:
        (tmp / "proc/device-tree").mkdir()
        (tmp / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    if tegra is not None:
        (tmp / "etc").mkdir()
        (tmp / "etc/nv_tegra_release").write_text(tegra)
    return tmp


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_detects_the_right_profile_on_fixture_trees(board, tmp_path):
    *files, expected = BOARDS[board]
    root = make_root(tmp_path, *files)
    found = detect(read_host_facts(root), devices.load_all())
    assert found is not None and found.profile == expected, found
    assert found.reasons[0].startswith("architecture is")


def test_reasons_name_the_evidence(tmp_path):
    root = make_root(tmp_path, *BOARDS["jetson-nano"][:-1])
    found = detect(read_host_facts(root), devices.load_all())
    assert "/proc/device-tree/model says 'NVIDIA Jetson Nano Developer Kit'" in found.reasons[1]
    shutil_root = make_root(tmp_path / "c", *BOARDS["orin-container"][:-1])
    found = detect(read_host_facts(shutil_root), devices.load_all())
    assert "/etc/nv_tegra_release is L4T R35" in found.reasons[1]


def test_warns_about_small_ram_and_missing_cpu_features(tmp_path):
    # a 1 GB Pi 4 whose kernel does not report crc32
    root = make_root(tmp_path, "aarch64", "Raspberry Pi 4 Model B Rev 1.1", None,
                     _cpuinfo(4, "fp asimd"), 900_000)
    found = detect(read_host_facts(root), devices.load_all())
    assert found.profile == "rpi4"
    assert any("878 MB RAM" in w for w in found.warnings)
    assert any("crc32" in w for w in found.warnings)


def test_a_32_bit_userland_on_a_64_bit_kernel_is_armv7l(monkeypatch):
    import platform
    import struct

    from edgeship.agent import capabilities

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert capabilities.machine() == ("armv7l" if struct.calcsize("P") == 4 else "aarch64")
    monkeypatch.setattr(struct, "calcsize", lambda fmt: 4)
    assert capabilities.machine() == "armv7l"  # what 32-bit Pi OS on a Pi 4 kernel runs
    assert read_host_facts(Path("/nonexistent")).arch == "armv7l"


def test_unknown_arch_matches_nothing():
    assert detect(HostFacts(arch="riscv64"), devices.load_all()) is None


def test_cli_detect_prints_profile_and_why(tmp_path, capsys):
    root = make_root(tmp_path, *BOARDS["pi-5"][:-1])
    assert main(["devices", "detect", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile: rpi5\n") and "Raspberry Pi 5 Model B" in out
    assert main(["devices", "detect", "--root", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"] == "rpi5" and doc["facts"]["ram_mb"] == 8_245_000 // 1024
    assert main(["devices", "detect", "--root", str(root), "--arch", "riscv64"]) == 1
