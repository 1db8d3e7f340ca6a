"""Stale resume files are removed: the partial download of a version whose transfer failed
(the repository lost the file mid-transfer) is kept to resume it — until a newer version of
the model is installed, after which nothing of it may stay on the device (the outside run
found 7 MB kept)."""

from __future__ import annotations

from tests.delivery.helpers import release_full, resume_files, start_agent, variant_target
from tests.support import wait_until
from tests.support.synthetic import write_synthetic_bundle

WIDTH = 512  # ~1 MB of weights


def test_the_partial_download_of_a_failed_version_goes_once_a_newer_one_installs(
        loop_env, tmp_path):
    agent = start_agent(loop_env, "dev", chunk_bytes=64 * 1024,
                        transfer_max_bytes_per_s=400_000, transfer_timeout_s=1.0)
    bundles = {v: write_synthetic_bundle(tmp_path / f"b{v}", version=v, width=WIDTH, seed=v)
               for v in (1, 2, 3)}
    loop_env.release(bundles[1])
    loop_env.wait_serving("dev", 1, timeout_s=90)
    release_full(loop_env, bundles[2], announce=True)
    wait_until(lambda: any(p.stat().st_size > 256 * 1024 for p in resume_files(agent)), 60,
               "part of v2 downloaded")
    target = variant_target(loop_env.repo, 2, "model.fp32.onnx", "synth")
    target.rename(target.with_name("lost"))  # mid-transfer: the next chunks are 404
    assert loop_env.wait_failed("dev", 2)["reason"] in ("transfer_failed", "not_found")
    target.with_name("lost").rename(target)
    assert resume_files(agent), "kept to resume v2 later (the scenario of the test)"
    release_full(loop_env, bundles[3], announce=True)
    loop_env.wait_serving("dev", 3, timeout_s=120)
    wait_until(lambda: not resume_files(agent), 10, "v2's partial download to go")
