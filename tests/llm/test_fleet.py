"""A real agent gets the tiny language model through the fleet (TUF over a real Mosquitto):
it picks the int4 variant its memory budget allows, health-checks it, serves it to the
`openai` client; a board whose budget is too small refuses it with a reason code; a broken
v2 fails its health check and v1 keeps serving."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import openai

from edgeship import devices
from edgeship.agent.manifest import MANIFEST_NAME, Manifest


def _tiny_board(tmp_path: Path) -> str:
    text = Path(devices.__file__).with_name("generic-x86_64.toml").read_text()
    path = tmp_path / "tiny-x86.toml"
    path.write_text(text.replace('name = "generic-x86_64"', 'name = "tiny-x86"')
                    .replace("model_memory_budget_mb = 1024", "model_memory_budget_mb = 32"))
    return str(path)


def _broken_v2(bundle: Path, out: Path) -> Path:
    """v2 = v1 whose golden next tokens belong to another model (health check must fail)."""
    shutil.copytree(bundle, out)
    with np.load(out / "golden.npz") as g:
        arrays = {k: (v[:, ::-1].copy() if k != "inputs" else v) for k, v in g.items()}
    np.savez(out / "golden.npz", **arrays)
    data = (out / "golden.npz").read_bytes()
    m = Manifest.from_bytes((out / MANIFEST_NAME).read_bytes())
    m = dataclasses.replace(m, version=2, golden_sha256=hashlib.sha256(data).hexdigest(),
                            golden_size=len(data))
    (out / MANIFEST_NAME).write_bytes(m.to_bytes())
    return out


def test_agent_installs_serves_refuses_and_keeps_serving(loop_env, tiny_lm, tmp_path):
    loop_env.release(tiny_lm.bundle)
    agent = loop_env.start_agent("lm-1")
    small = loop_env.start_agent("lm-small", _tiny_board(tmp_path))
    serving = loop_env.wait_serving("lm-1", 1, timeout_s=120)
    assert serving["variant"] == "onnx-int4"  # the smallest precision that fits 1024 MB
    assert agent.server.get("tinylm").installed.variant.id == "onnx-int4"
    refused = loop_env.wait_failed("lm-small", 1, timeout_s=120)
    assert refused["reason"] == "memory_budget_exceeded"
    assert small.server.find("tinylm") is None  # nothing downloaded, nothing served
    client = openai.OpenAI(base_url=agent.api.url + "/v1", api_key="-", max_retries=0)
    first = client.completions.create(model="tinylm", prompt="The for statement",
                                      max_tokens=8, temperature=0)
    assert first.usage.completion_tokens >= 1
    loop_env.release(_broken_v2(tiny_lm.bundle, tmp_path / "v2"))
    failed = loop_env.wait_failed("lm-1", 2, timeout_s=120)
    assert failed["reason"] in ("token_mismatch", "golden_mismatch")
    again = client.completions.create(model="tinylm", prompt="The for statement",
                                      max_tokens=8, temperature=0)
    assert again.choices[0].text == first.choices[0].text  # v1, untouched
