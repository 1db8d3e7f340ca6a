"""Helpers for scripts/arm64-check (not a test module).

``stage DIR``: on the host, train + convert the digits CNN briefly, deliver it to an agent
over a real Mosquitto, stop — leaving ``DIR/state`` (an agent state directory with the model
installed and active), ``DIR/agent.toml`` pointing at a broker that does not exist, and
``DIR/sample.json`` (one held-out image and its label).

``infer DIR``: inside the arm64 rootfs, start the agent from that config (no broker: it serves
the installed model offline), send the sample through the local HTTP API, print the answer.
``deselect``: a pytest plugin (``-p tests.provisioning.arm64_stage``) that drops the tests
which need a broker or torch.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

NEEDS_HOST = {"broker", "shared_broker", "loop_env", "digits_bundles", "locked_broker"}


def pytest_collection_modifyitems(config, items):  # pytest plugin hook
    def needs_host(item) -> bool:
        names = set(getattr(item, "fixturenames", ()))
        return bool(NEEDS_HOST & names) or any("broker" in n for n in names)

    keep = [i for i in items if not needs_host(i)]
    drop = [i for i in items if i not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def stage(out: Path) -> None:
    from edgeship.converter.digits import train_digits
    from edgeship.converter.pipeline import convert_digits
    from edgeship.fleet.broker import Mosquitto, free_port
    from tests.support.loop_env import LoopEnv, predict

    trained = train_digits(epochs=2)
    bundle = convert_digits(out / "bundle", version=1, trained=trained)
    mosq = Mosquitto().start()
    try:
        env = LoopEnv(mosq.url, out / "host")
        try:
            agent = env.start_agent("arm64-check", profile="generic-arm64")
            env.release(bundle.bundle_dir)
            env.wait_serving("arm64-check", 1, timeout_s=120)
            x = trained.data.x_test[:8]
            host_doc = predict(agent, "digits", x)
        finally:
            env.close()
    finally:
        mosq.cleanup()
    state = out / "host" / "devices" / "arm64-check"
    (out / "agent.toml").write_text(
        '[agent]\ndevice_id = "arm64-check"\nstate_dir = "/opt/arm64-check/state"\n'
        f'mqtt_url = "mqtt://127.0.0.1:{free_port()}"\nprofile = "generic-arm64"\n'
        "api_port = 8470\n")
    state.rename(out / "state")
    (out / "sample.json").write_text(json.dumps({
        "inputs": x.tolist(), "labels": [int(v) for v in trained.data.y_test[:8]],
        "host_outputs": next(iter(host_doc["outputs"].values())),
        "host_variant": host_doc.get("variant")}))


def infer(root: Path) -> int:
    from edgeship.agent.config import load_config
    from edgeship.agent.daemon import Agent

    agent = Agent(load_config(root / "agent.toml"))
    agent.start()
    try:
        sample = json.loads((root / "sample.json").read_text())
        body = json.dumps({"inputs": sample["inputs"]}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(f"{agent.api.url}/v1/models/digits/predict",
                                             data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    doc = json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        got = next(iter(doc["outputs"].values()))
        want = sample["host_outputs"]
        diff = max(abs(a - b) for ga, wa in zip(got, want) for a, b in zip(ga, wa))
        same = [_argmax(g) == _argmax(w) for g, w in zip(got, want)]
        print(f"arm64 inference through the local API: {len(got)} images, variant "
              f"{doc.get('variant', '?')}; predictions equal to the x86_64 agent's: "
              f"{sum(same)}/{len(same)}; max |arm64 - x86_64| = {diff:.3g}; labels "
              f"{sample['labels']}, arm64 {[_argmax(g) for g in got]}")
        return 0 if all(same) else 1
    finally:
        agent.stop()


def _argmax(v: list[float]) -> int:
    return max(range(len(v)), key=v.__getitem__)


if __name__ == "__main__":
    cmd, path = sys.argv[1], Path(sys.argv[2])
    sys.exit(stage(path) or 0 if cmd == "stage" else infer(path))
