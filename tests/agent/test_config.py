import pytest

from edgeship.agent.config import config_from_dict, load_config
from edgeship.agent.errors import ConfigError


def test_a_valid_config_loads_with_defaults(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('[agent]\ndevice_id = "pi-1"\nstate_dir = "/tmp/x"\napi_port = 9000\n')
    cfg = load_config(f)
    assert cfg.device_id == "pi-1" and cfg.api_port == 9000
    assert cfg.telemetry_interval_s == 60.0


@pytest.mark.parametrize("raw,key", [
    ({"device_id": "a", "state_dir": "/x", "api_prot": 1}, "api_prot"),
    ({"state_dir": "/x"}, "device_id"),
    ({"device_id": "a b", "state_dir": "/x"}, "device_id"),
    ({"device_id": "a", "state_dir": "/x", "api_port": "80"}, "api_port"),
    ({"device_id": "a", "state_dir": "/x", "chunk_bytes": 0}, "chunk_bytes"),
    ({"device_id": "a", "state_dir": "/x", "chunk_bytes": 10**9}, "chunk_bytes"),
    ({"device_id": "a", "state_dir": "/x", "llm_max_active": 0}, "llm_max_active"),
    ({"device_id": "a", "state_dir": "/x", "llm_max_queued": -1}, "llm_max_queued"),
])
def test_bad_configs_name_the_bad_key(raw, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.key == key
    assert key in str(err.value)


def test_an_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key 'api_prot' \(did you mean 'api_port'\?\)"):
        config_from_dict({"device_id": "a", "state_dir": "/x", "api_prot": 1})
    with pytest.raises(ConfigError) as err:
        config_from_dict({"device_id": "a", "state_dir": "/x", "colour": "red"})
    assert "did you mean" not in str(err.value)  # nothing close: no guess


def test_language_model_admission_comes_from_the_config(tmp_path):
    from edgeship.agent.daemon import Agent
    from edgeship.agent.llm.http import frontend

    cfg = config_from_dict({"device_id": "pi-1", "state_dir": str(tmp_path),
                            "llm_max_active": 2, "llm_max_queued": 0,
                            "llm_queue_timeout_s": 5.0})
    admission = frontend(Agent(cfg).server).admission
    assert (admission.max_active, admission.max_queued, admission.queue_timeout_s) == \
        (2, 0, 5.0)
