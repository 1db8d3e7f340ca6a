"""Child process of the health check (see ``agent.health.check_in_subprocess``).

    python -m agent.healthcheck_worker '<request JSON>'

Sets its own RLIMIT_AS / RLIMIT_CPU before importing the runtime, loads the installed
version, runs ``check_health`` and prints one JSON line: ``{"ok": true, ...}`` or
``{"ok": false, "reason": ..., "message": ...}``. A crash or a limit ends the process; the
parent maps the signal to a reason code.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def _limit(request: dict) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (request["address_space_bytes"],) * 2)
    cpu = int(request["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))


def _check(request: dict) -> dict:
    from edgeship.agent.errors import EdgeshipError
    from edgeship.agent.health import check_health
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.signature import check_signature
    from edgeship.agent.store import ModelStore

    directory = Path(request["dir"])
    store = ModelStore(directory.parent.parent)
    try:
        installed = store.load(directory.parent.name, int(directory.name))
        runtime = load_runtime(installed.variant.runtime, installed.model_path,
                               threads=request["threads"],
                               providers=request["providers"] or None)
        check_signature(runtime, installed.manifest)
        report = check_health(runtime, installed.manifest, installed.variant,
                              installed.golden_path,
                              latency_budget_ms=request["latency_budget_ms"])
    except EdgeshipError as e:
        return {"ok": False, "reason": e.reason_code.value, "message": str(e),
                "max_abs_diff": getattr(e, "max_abs_diff", None)}
    return {"ok": True, "max_abs_diff": report.max_abs_diff,
            "latency_ms": report.latency_ms, "samples": report.samples}


def main(argv: list[str]) -> int:
    request = json.loads(argv[1])
    _limit(request)
    try:
        result = _check(request)
    except MemoryError:
        result = {"ok": False, "reason": "health_check_out_of_memory",
                  "message": "health check ran out of memory"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
