"""Stale resume files are removed: the partial download of a version whose transfer failed
(the fleet server went away) is kept to resume it — until a newer version of the model is
installed, after which nothing of it may stay on the device (the outside run found 7 MB
kept)."""

from __future__ import annotations

from edgeship.fleet.server import FleetServer, FleetSettings
from tests.delivery.helpers import release_full, resume_files, start_agent
from tests.support import wait_until
from tests.support.synthetic import write_synthetic_bundle

WIDTH = 724  # ~2 MB of weights


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
    loop_env.fleet.stop()  # mid-transfer
    assert loop_env.wait_failed("dev", 2)["reason"] in ("transfer_timeout", "transfer_failed")
    assert resume_files(agent), "kept to resume v2 later (the scenario of the test)"
    loop_env.fleet = FleetServer(FleetSettings(mqtt_url=loop_env.url, repo_dir=loop_env.repo,
                                               db_path=tmp_path / "fleet2.db"))
    loop_env.fleet.start()
    release_full(loop_env, bundles[3], announce=True)
    loop_env.wait_serving("dev", 3, timeout_s=120)
    wait_until(lambda: not resume_files(agent), 10, "v2's partial download to go")
