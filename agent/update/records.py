"""Where update records live: ``<state>/updates/<model>.json``, written atomically."""

from __future__ import annotations

from pathlib import Path

from edgeship.agent.errors import TransitionError
from edgeship.agent.update.table import State, UpdateRecord
from edgeship.common.fsutil import atomic_write


class RecordStore:
    """Persists one UpdateRecord per model under ``<state>/updates/<model>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self, model: str) -> UpdateRecord:
        path = self.root / f"{model}.json"
        if not path.exists():
            return UpdateRecord(model=model)
        try:
            return UpdateRecord.from_bytes(path.read_bytes())
        except (ValueError, TypeError, KeyError, TransitionError):
            return UpdateRecord(model=model, state=State.FAILED, reason="corrupt_record")

    def exists(self, model: str) -> bool:
        return (self.root / f"{model}.json").exists()

    def save(self, record: UpdateRecord) -> UpdateRecord:
        atomic_write(self.root / f"{record.model}.json", record.to_bytes())
        return record

    def clean_temp(self) -> list[Path]:
        """Temp files of a save interrupted by a crash."""
        removed = []
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def all(self) -> list[UpdateRecord]:
        return [self.load(p.stem) for p in sorted(self.root.glob("*.json"))]
