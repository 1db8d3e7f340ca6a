"""Capability detection (parsers) and the pick it leads to, for the boards we ship profiles
for; `edgeship agent info --json` prints both."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeship.agent.capabilities import Capabilities, detect, parse_cpuinfo, parse_meminfo_mb, plan

PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
ORIN_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm
"""
X86_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512bw avx512_vnni
"""
OLD_X86_CPUINFO = "model name\t: Intel Atom\nflags\t\t: fpu sse sse2 ssse3\n"


def _caps(cpuinfo: str, arch: str, providers=("CPUExecutionProvider",), cores=4,
          gpu=None) -> Capabilities:
    flags, model = parse_cpuinfo(cpuinfo)
    return Capabilities(arch=arch, cores=cores, ram_mb=4096, cpu_model=model,
                        cpu_features=tuple(sorted(flags)), gpu=gpu,
                        onnx_providers=tuple(providers), runtimes=("onnxruntime", "litert"),
                        litert_backend="ai_edge_litert", numpy_version="2.0")


def test_cpuinfo_flags_on_arm_and_x86():
    flags, model = parse_cpuinfo(ORIN_CPUINFO)
    assert {"asimddp", "i8mm", "fphp", "neon"} <= flags
    flags, model = parse_cpuinfo(X86_CPUINFO)
    assert {"avx2", "avx512_vnni"} <= flags and "Xeon" in model
    flags, model = parse_cpuinfo(PI4_CPUINFO)
    assert "asimddp" not in flags and "asimd" in flags and "BCM2835" in model
    assert parse_meminfo_mb("MemTotal:        3884564 kB\nMemFree: 1 kB\n") == 3793


def _plan_for(profile_name: str, caps: Capabilities, threads_override: int = 0):
    from edgeship import devices
    p = devices.load_profile(profile_name)
    return plan(caps, profile_providers=p.execution_providers, profile_runtimes=p.runtimes,
                profile_precisions=p.preferred_precisions, profile_threads=p.threads,
                threads_override=threads_override)


def test_pi4_picks_int8_on_cpu_with_four_threads():
    chosen = _plan_for("rpi4", _caps(PI4_CPUINFO, "aarch64"))
    assert chosen.precisions[0].startswith("int8")
    assert chosen.providers == ("CPUExecutionProvider",)
    assert chosen.threads == 4 and "litert" in chosen.runtimes


def test_jetson_with_cuda_picks_fp16_on_the_gpu_provider():
    caps = _caps(ORIN_CPUINFO, "aarch64", gpu="nvidia-jetson", cores=6, providers=(
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    chosen = _plan_for("jetson-orin-nano", caps)
    assert chosen.precisions[0] == "fp16"
    assert chosen.providers[0] == "TensorrtExecutionProvider"
    assert chosen.providers[-1] == "CPUExecutionProvider"


def test_jetson_without_cuda_build_does_not_pick_fp16_first():
    chosen = _plan_for("jetson-orin-nano", _caps(ORIN_CPUINFO, "aarch64", cores=6))
    assert chosen.precisions[0] != "fp16" and chosen.precisions[-1] == "fp16"
    assert chosen.providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize("cpuinfo,first", [(OLD_X86_CPUINFO, "fp32"),
                                             (X86_CPUINFO, "int8-static")])
def test_int8_goes_behind_fp32_only_without_int8_simd(cpuinfo, first):
    chosen = plan(_caps(cpuinfo, "x86_64"), profile_providers=["CPUExecutionProvider"],
                  profile_runtimes=["onnxruntime"], profile_precisions=["int8-static", "fp32"],
                  profile_threads=4)
    assert chosen.precisions[0] == first


def test_threads_are_capped_by_cores_and_config_wins():
    assert _plan_for("rpi4", _caps(PI4_CPUINFO, "aarch64", cores=2)).threads == 2
    assert _plan_for("rpi4", _caps(PI4_CPUINFO, "aarch64"), threads_override=1).threads == 1


def test_detect_on_this_machine_is_consistent():
    caps = detect()
    assert caps.cores >= 1 and caps.ram_mb > 0 and caps.arch
    assert "CPUExecutionProvider" in caps.onnx_providers and "onnxruntime" in caps.runtimes


def test_agent_info_json_prints_found_and_picked():
    out = subprocess.run([sys.executable, "-m", "edgeship.cli", "agent", "info",
                          "--profile", "rpi4", "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["found"]["cores"] >= 1 and "onnx_providers" in doc["found"]
    assert doc["plan"]["precisions"][0].startswith("int8")
    assert doc["plan"]["providers"][-1] == "CPUExecutionProvider"


def test_agent_info_with_a_bundle_names_the_variant_it_would_serve(tmp_path):
    from dataclasses import replace

    from edgeship.agent.manifest import MANIFEST_NAME
    from tests.runtime.models import manifest_for

    base = manifest_for("m.onnx", "onnxruntime")
    variants = tuple(replace(base.variants[0], id=f"onnx-{p}", precision=p,
                             file=f"{p}.onnx")
                     for p in ("fp32", "fp16", "int8-static"))
    (tmp_path / MANIFEST_NAME).write_bytes(replace(base, variants=variants).to_bytes())
    picks = {}
    for profile in ("rpi4", "generic-x86_64"):
        out = subprocess.run([sys.executable, "-m", "edgeship.cli", "agent", "info",
                              "--profile", profile, "--bundle", str(tmp_path), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        picks[profile] = json.loads(out.stdout)["bundle"]["variant"]
    assert picks["rpi4"] == "onnx-int8-static"  # int8 SIMD here (avx2 or asimd): the Pi profile's pick
    assert picks["generic-x86_64"] != "onnx-fp16"  # no GPU here: never fp16 on a CPU
