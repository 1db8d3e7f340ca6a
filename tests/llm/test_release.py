"""Release-time memory admission: `edgeship release --profile P` refuses, before signing, a
language model none of whose variants fits P's model_memory_budget_mb."""

from __future__ import annotations

import json
from pathlib import Path

from edgeship import devices

from edgeship.cli import main
from edgeship.fleet.llm_release import memory_fits
from edgeship.fleet.tuf_repo import init_repository


def test_release_refuses_a_model_that_fits_no_variant_into_the_profile(tiny_lm, tmp_path,
                                                                       capsys):
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    init_repository(keys, repo)
    def signed():
        return {p.name: p.read_bytes() for p in (repo / "metadata").rglob("*.json")}

    before = signed()
    small = tmp_path / "tiny-board.toml"  # a custom board profile: 32 MB for models
    rpi4 = Path(devices.__file__).with_name("rpi4.toml").read_text()
    small.write_text(rpi4.replace('name = "rpi4"', 'name = "tiny-board"')
                     .replace("model_memory_budget_mb = 1024", "model_memory_budget_mb = 32"))
    argv = ["release", str(tiny_lm.bundle), "--repo", str(repo), "--keys", str(keys)]
    assert main(argv + ["--profile", str(small)]) == 1
    err = capsys.readouterr().err
    assert "fits no variant into profile tiny-board" in err and "32 MB" in err
    assert signed() == before  # nothing was signed
    assert main(argv + ["--profile", "rpi4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1


def test_each_profile_gets_the_smallest_variant_that_fits(tiny_lm):
    fits = memory_fits(tiny_lm.manifest, {"zero": 96.0, "none": 10.0})
    assert fits[0].variant == "onnx-int4" and fits[0].need_mb <= 96
    assert fits[1].variant is None and "allows 10 MB" in fits[1].reason
