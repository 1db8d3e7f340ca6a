"""What the device side needs from Python 3.11, on the Pythons devices ship (Debian 11 /
Pi OS bullseye: 3.9; JetPack 6: 3.10). One place; nothing else checks ``sys.version_info``.
Guards: tests/packaging/test_py39.py (3.9's grammar), mypy --python-version 3.10 in
./scripts/test, and scripts/py39-check (the agent's tests on a real 3.9)."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    import tomllib
    from enum import StrEnum
else:  # pragma: no cover - exercised by scripts/py39-check
    import tomli as tomllib

    class StrEnum(str, Enum):
        """``enum.StrEnum``: members are strings; ``str()`` and ``format()`` give the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)

__all__ = ["StrEnum", "tomllib"]
