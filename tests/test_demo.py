"""The demo's loop with two agent processes, a fleet server process and a real broker."""

from edgeship.demo import Demo, DemoSettings


def test_demo_loop_every_agent_serves_with_the_accuracy_the_converter_measured(broker,
                                                                              tmp_path):
    settings = DemoSettings(work_dir=tmp_path / "demo", agents=2, epochs=8,
                            mqtt_url=broker.url, telemetry_interval_s=1.0)
    result = Demo(settings, quiet=True).run()
    assert result.error is None, result.error
    assert len(result.rows) == 2
    for row in result.rows:
        assert row.error is None, row.error
        assert row.version == 1
        assert row.requests == 450  # every held-out image went through the local API
        assert abs(row.accuracy - row.expected_accuracy) <= 0.01
        assert row.accuracy > 0.9
        assert row.p50_ms is not None and row.p50_ms > 0  # came back as telemetry
    assert {r.variant for r in result.rows} == {"onnx-int8", "onnx-fp32"}  # by profile
    assert result.ok
