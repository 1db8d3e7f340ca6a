"""The work of the install states that touches runtimes: the health check, loading and
warming a version, the shadow run beside the served version, the trial window's watch and
switching back to a kept version. Each raises on failure; none touches the update record."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.agent.health import (HealthLimits, HealthReport, check_health, check_in_subprocess,
                                   load_golden)
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.runtime import ModelRuntime, load_runtime
from edgeship.agent.serving import LoadedModel, ModelServer
from edgeship.agent.store import InstalledModel
from edgeship.agent.update.download import Report
from edgeship.agent.update.settings import DeviceTraits, InstallSettings

logger = logging.getLogger(__name__)

#: Called while a shadow run or a trial waits (the driver's observer point "watching").
Tick = Callable[[], None]


class TrialFailedError(EdgeshipError):
    reason_code = Reason.TRIAL_ERROR_RATE


class StoppingError(EdgeshipError):
    """The agent is shutting down mid-step: leave the record as it is (it resumes)."""


class Steps:
    def __init__(self, *, server: ModelServer, traits: DeviceTraits, settings: InstallSettings,
                 report: Report, stopping: threading.Event) -> None:
        self.server = server
        self.traits = traits
        self.settings = settings
        self.report = report
        self.stopping = stopping

    def load(self, installed: InstalledModel) -> ModelRuntime:
        return load_runtime(installed.variant.runtime, installed.model_path,
                            threads=self.traits.threads, providers=self.traits.providers)

    def health_check(self, installed: InstalledModel) -> HealthReport:
        t = self.traits
        if self.settings.health_in_subprocess:
            limits = self.settings.health
            limits = HealthLimits(timeout_s=limits.timeout_s,
                                  max_memory_mb=limits.max_memory_mb, threads=t.threads,
                                  providers=t.providers, latency_budget_ms=t.latency_budget_ms)
            report = check_in_subprocess(installed.directory, installed.variant.id, limits)
        else:
            report = check_health(self.load(installed), installed.manifest,
                                  installed.variant, installed.golden_path,
                                  latency_budget_ms=t.latency_budget_ms)
        logger.info("%s v%s healthy: max_abs_diff=%.3g latency=%.2f ms", installed.model,
                    installed.version, report.max_abs_diff, report.latency_ms)
        return report

    def warm(self, installed: InstalledModel) -> LoadedModel:
        """Load the runtime in this process and run the golden batch once, off the
        serving path, so the first live request does not pay for initialisation."""
        runtime = self.load(installed)
        inputs, _ = load_golden(installed.golden_path, installed.variant)
        spec = installed.manifest.inputs[0]
        try:
            runtime.run({spec.name: np.asarray(inputs, dtype=spec.dtype)})
        except Exception as e:
            raise EdgeshipError(f"warm-up failed: {e}",
                                reason_code=Reason.HEALTH_CHECK_FAILED) from e
        return LoadedModel(installed, runtime)

    def wants_shadow(self, installed: InstalledModel) -> bool:
        """The release asks for a shadow run and a version is being served to compare."""
        return installed.manifest.shadow is not None and \
            self.server.find(installed.model) is not None

    def shadow_run(self, installed: InstalledModel, tick: Tick) -> tuple[LoadedModel, float]:
        """Run the candidate beside the served version on a sample of live requests."""
        from edgeship.agent.shadow import ShadowRun

        policy = installed.manifest.shadow
        assert policy is not None
        loaded = self.warm(installed)
        run = ShadowRun(loaded, policy)
        self.server.shadows[installed.model] = run
        try:
            deadline = time.monotonic() + policy.timeout_s
            while run.compared < policy.samples and time.monotonic() < deadline:
                if self.stopping.wait(0.05):
                    raise StoppingError("the agent is stopping")
                tick()
        finally:
            self.server.shadows.pop(installed.model, None)
            run.close()
        self.report(StatusEvent.SHADOW_RESULT, model=installed.model,
                    version=installed.version, shadow=run.summary())
        if run.compared < policy.samples:
            raise EdgeshipError(f"only {run.compared} of {policy.samples} shadow samples in "
                                f"{policy.timeout_s:g} s", reason_code=Reason.SHADOW_DISAGREEMENT)
        if run.agreement < policy.min_agreement:
            raise EdgeshipError(f"top-1 agreement {run.agreement:.3f} with the served version "
                                f"is below {policy.min_agreement:g} ({run.compared} samples)",
                                reason_code=Reason.SHADOW_DISAGREEMENT)
        logger.info("%s v%s agrees with the served version on %.1f%% of %d samples",
                    installed.model, installed.version, 100 * run.agreement, run.compared)
        return loaded, run.agreement

    def watch_trial(self, model: str, version: int, superseded: Callable[[str, int], bool],
                    tick: Tick) -> None:
        """The trial window: the new version serves; a model-error rate over the limit
        raises, a newer version waiting cuts the window short."""
        s = self.settings
        stats = self.server.stats_for(model)
        req0, err0 = stats.total_requests, stats.total_model_errors
        deadline = time.monotonic() + s.trial_window_s
        tick_s = max(0.01, min(0.2, s.trial_window_s / 10))
        while time.monotonic() < deadline:
            if self.stopping.wait(tick_s):
                raise StoppingError("the agent is stopping")
            tick()
            requests, errors = stats.total_requests - req0, stats.total_model_errors - err0
            if requests >= s.trial_min_requests and errors / requests > s.trial_max_error_rate:
                raise TrialFailedError(f"{errors} of {requests} requests failed during the "
                                       f"trial (max rate {s.trial_max_error_rate:g})")
            if superseded(model, version):
                logger.info("trial of %s v%s cut short by a newer release", model, version)
                return
