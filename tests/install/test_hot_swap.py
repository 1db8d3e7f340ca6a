"""Hot swap under load: clients keep calling the local API while new versions are
installed (loaded and warmed first, then swapped by reference) and one is reverted; not a
single request fails, and each client sees versions only move the way the updates went."""

from __future__ import annotations

import threading

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from tests.support import models
from tests.support.agent_process import predict, write_config
from tests.support import wait_until

DEVICE = "hot-swap"


def test_no_request_fails_while_versions_are_swapped_in_and_one_is_reverted(fleet):
    cfg = write_config(fleet.root / DEVICE, DEVICE, fleet.env.url, fleet.env.repo,
                       trial_window_s=1.0, trial_min_requests=5, trial_max_error_rate=0.05)
    agent = Agent(load_config(cfg))
    agent.start()
    fleet.env.agents.append(agent)
    fleet.release("hot", 1, models.good(1))
    fleet.env.wait_serving(DEVICE, 1)
    port = agent.api.server_address[1]
    stop = threading.Event()
    results: list[list[tuple[int, int | None]]] = [[] for _ in range(4)]

    def client(out: list) -> None:
        x = models.golden_inputs()[:2].tolist()
        while not stop.is_set():
            status, doc = predict(port, "hot", x)
            out.append((status, doc.get("version")))

    threads = [threading.Thread(target=client, args=(r,)) for r in results]
    for t in threads:
        t.start()
    try:
        for v in (2, 3):
            fleet.release("hot", v, models.good(v))
            fleet.env.wait_serving(DEVICE, v, timeout_s=90)
            wait_until(lambda: fleet.chain(DEVICE, v)[-1:] == ["committed"], 60, "commit")
        fleet.release("hot", 4, models.nan_outputs(4))  # fails its health check
        fleet.env.wait_failed(DEVICE, 4, timeout_s=90)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    flat = [r for rs in results for r in rs]
    assert len(flat) > 100
    assert [r for r in flat if r[0] != 200] == []
    assert {v for _, v in flat} == {1, 2, 3}
    for rs in results:  # per client, versions never go backwards
        versions = [v for _, v in rs]
        assert versions == sorted(versions)
