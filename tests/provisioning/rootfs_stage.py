"""Helpers for the scripts/*-check scripts (arm64, py39, armhf; not a test module).

``stage DIR PROFILE [VARIANTS]``: on the host, train + convert the digits CNN briefly (the
given variants, e.g. ``tflite-fp32,tflite-int8``), deliver it to an agent with board profile
PROFILE over a real Mosquitto, stop — leaving ``DIR/state`` (an agent state directory with
the model installed and active), ``DIR/agent.toml`` pointing at a broker that does not exist,
and ``DIR/sample.json`` (held-out images, labels and the host agent's answers).

``infer DIR``: inside the check's root file system, start the agent from that config (no
broker: it serves the installed model offline), send the sample through the local HTTP API,
compare with the host's answers, and print the agent's idle memory.
``deselect``: a pytest plugin (``-p tests.provisioning.rootfs_stage``) that drops the tests
which need a broker or torch.
"""

from __future__ import annotations

import json
import platform
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


def stage(out: Path, profile: str, variants: tuple[str, ...] = ()) -> None:
    from edgeship.converter.digits import train_digits
    from edgeship.converter.pipeline import ConvertSettings, convert_digits
    from edgeship.fleet.broker import Mosquitto, free_port
    from tests.support.loop_env import LoopEnv, predict

    trained = train_digits(epochs=2)
    settings = ConvertSettings(variants=variants) if variants else None
    bundle = convert_digits(out / "bundle", version=1, trained=trained, settings=settings)
    mosq = Mosquitto().start()
    try:
        env = LoopEnv(mosq.url, out / "host")
        try:
            agent = env.start_agent("rootfs-check", profile=profile)
            env.release(bundle.bundle_dir)
            env.wait_serving("rootfs-check", 1, timeout_s=120)
            x = trained.data.x_test[:8]
            host_doc = predict(agent, "digits", x)
        finally:
            env.close()
    finally:
        mosq.cleanup()
    state = out / "host" / "devices" / "rootfs-check"
    (out / "agent.toml").write_text(
        '[agent]\ndevice_id = "rootfs-check"\nstate_dir = "/opt/rootfs-check/state"\n'
        f'mqtt_url = "mqtt://127.0.0.1:{free_port()}"\nprofile = "{profile}"\n'
        "api_port = 8470\n")
    state.rename(out / "state")
    (out / "sample.json").write_text(json.dumps({
        "inputs": x.tolist(), "labels": [int(v) for v in trained.data.y_test[:8]],
        "host_outputs": next(iter(host_doc["outputs"].values())),
        "host_variant": host_doc.get("variant")}))


def _post(url: str, body: bytes) -> dict:
    deadline = time.monotonic() + 120
    while True:
        try:
            req = urllib.request.Request(url, data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def infer(root: Path) -> int:
    from edgeship.agent.config import load_config
    from edgeship.agent.daemon import Agent

    agent = Agent(load_config(root / "agent.toml"))
    agent.start()
    try:
        time.sleep(2)
        idle_mb = rss_mb()  # serving its model, no request yet, no broker
        sample = json.loads((root / "sample.json").read_text())
        doc = _post(f"{agent.api.url}/v1/models/digits/predict",
                    json.dumps({"inputs": sample["inputs"]}).encode())
        got = next(iter(doc["outputs"].values()))
        want = sample["host_outputs"]
        diff = max(abs(a - b) for ga, wa in zip(got, want) for a, b in zip(ga, wa))
        same = [_argmax(g) == _argmax(w) for g, w in zip(got, want)]
        print(f"{platform.machine()} inference through the local API (Python "
              f"{platform.python_version()}): {len(got)} images, variant "
              f"{doc.get('variant', '?')}; predictions equal to the host agent's: "
              f"{sum(same)}/{len(same)}; max |device - host| = {diff:.3g}; labels "
              f"{sample['labels']}, device {[_argmax(g) for g in got]}; agent idle RSS "
              f"{idle_mb:.1f} MB")
        return 0 if all(same) else 1
    finally:
        agent.stop()


def _argmax(v: list[float]) -> int:
    return max(range(len(v)), key=v.__getitem__)


if __name__ == "__main__":
    cmd, path = sys.argv[1], Path(sys.argv[2])
    if cmd == "stage":
        stage(path, sys.argv[3], tuple(v for v in sys.argv[4:5] for v in v.split(",") if v))
        sys.exit(0)
    sys.exit(infer(path))
