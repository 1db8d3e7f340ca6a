"""Fleet-only errors. All subclass :class:`agent.errors.EdgeshipError`."""

from __future__ import annotations

from edgeship.agent.errors import EdgeshipError, Reason


class RepositoryError(EdgeshipError):
    """The TUF repository or its keys are missing, already exist, or are inconsistent."""

    reason_code = Reason.INTERNAL


class ReleaseRejectedError(EdgeshipError):
    """A bundle's model version is not newer than the newest one already released."""

    reason_code = Reason.ROLLBACK
    bad_input = True  # the CLI exits 2: the bundle given is not newer

    def __init__(self, message: str, *, model: str, version: int, latest: int) -> None:
        super().__init__(message)
        self.model = model
        self.version = version
        self.latest = latest
