"""The health-check child process on its own: limits and the reason code of each failure."""

from __future__ import annotations

import shutil

import pytest

from edgeship.agent.errors import HealthCheckError
from edgeship.agent.health import HealthLimits, check_in_subprocess
from edgeship.agent.manifest import Manifest
from edgeship.agent.store import ModelStore
from tests.support import models


def _installed(tmp_path, onnx_model, version: int = 1):
    bundle = models.write_bundle(tmp_path / "bundle", "tiny", version, onnx_model)
    store = ModelStore(tmp_path / "models")
    staging = store.staging_dir("tiny", version)
    for p in bundle.iterdir():
        shutil.copy(p, staging / p.name)
    manifest = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    return store.finalize("tiny", version, staging, manifest, manifest.variants[0])


def test_a_good_model_passes_and_reports_its_latency(tmp_path):
    inst = _installed(tmp_path, models.good(1))
    report = check_in_subprocess(inst.directory, inst.variant.id,
                                 HealthLimits(timeout_s=60, threads=1, latency_budget_ms=50))
    assert report.max_abs_diff < 1e-5 and report.samples == models.GOLDEN_N
    assert 0 < report.latency_ms < 50


def test_a_model_that_needs_more_memory_than_the_limit_fails_as_out_of_memory(tmp_path):
    inst = _installed(tmp_path, models.memory_hog(1))  # a 3.2 GB intermediate tensor
    with pytest.raises(HealthCheckError) as e:
        check_in_subprocess(inst.directory, inst.variant.id,
                            HealthLimits(timeout_s=60, max_memory_mb=256, threads=1))
    assert e.value.reason_code == "health_check_out_of_memory", e.value


def test_a_damaged_active_version_is_not_served_after_a_restart(tmp_path):
    """Bit rot or a torn write: on start the agent falls back to a kept version whose
    files still match their manifest."""
    import threading

    from edgeship.agent.serving import ModelServer
    from edgeship.agent.update.driver import UpdateDriver
    from edgeship.agent.update.records import RecordStore
    from edgeship.agent.update.settings import DeviceTraits, InstallSettings
    from edgeship.agent.update.steps import Steps

    old = _installed(tmp_path, models.good(1), version=1)
    store = ModelStore(tmp_path / "models")
    new = _installed(tmp_path / "b2", models.good(2), version=2)
    shutil.move(str(new.directory), str(store.root / "tiny" / "2"))
    store.activate("tiny", 2)
    data = bytearray((store.root / "tiny" / "2" / models.MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (store.root / "tiny" / "2" / models.MODEL_FILE).write_bytes(bytes(data))
    events = []
    report = lambda ev, **kw: events.append((ev, kw))  # noqa: E731
    steps = Steps(server=ModelServer(), settings=InstallSettings(), report=report,
                  traits=DeviceTraits("x86_64", ("onnxruntime",), ("fp32",), 1,
                                      ("CPUExecutionProvider",)),
                  stopping=threading.Event())
    updates = UpdateDriver(store=store, records=RecordStore(tmp_path / "updates"),
                           server=steps.server, downloader=None, steps=steps, report=report,
                           settings=steps.settings)  # no download: serves what is on disk
    assert [m.version for m in updates.load_active()] == [old.version]
    assert store.active_version("tiny") == 1
    assert events[0][0] == "serving" and events[0][1]["reason"] == "hash_mismatch"
