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
    keep = [i for i in items if not NEEDS_HOST & set(getattr(i, "fixturenames", ()))]
    drop = [i for i in items if i not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def stage(out: Path) -> None:
    from converter.digits import train_digits
    from converter.pipeline import convert_digits
    from fleet.broker import Mosquitto, free_port
    from tests.loop_env import LoopEnv

    trained = train_digits(epochs=2)
    bundle = convert_digits(out / "bundle", version=1, trained=trained)
    mosq = Mosquitto().start()
    try:
        env = LoopEnv(mosq.url, out / "host")
        try:
            env.start_agent("arm64-check", profile="generic-arm64")
            env.release(bundle.bundle_dir)
            env.wait_serving("arm64-check", 1, timeout_s=120)
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
    x, y = trained.data.x_test[:1], int(trained.data.y_test[0])
    (out / "sample.json").write_text(json.dumps({"inputs": x.tolist(), "label": y}))


def infer(root: Path) -> int:
    from agent.config import load_config
    from agent.daemon import Agent

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
        scores = next(iter(doc["outputs"].values()))[0]
        got = max(range(len(scores)), key=scores.__getitem__)
        print(f"arm64 inference: predicted {got}, label {sample['label']}, "
              f"variant {doc.get('variant')}")
        return 0 if got == sample["label"] else 1
    finally:
        agent.stop()


if __name__ == "__main__":
    cmd, path = sys.argv[1], Path(sys.argv[2])
    sys.exit(stage(path) or 0 if cmd == "stage" else infer(path))
