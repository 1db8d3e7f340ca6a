"""What the agent needs from Python 3.11, on the Pythons devices ship (Debian 11 / Pi OS
bullseye: 3.9; JetPack 6: 3.10). One place; nothing else checks ``sys.version_info``."""

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

        __format__ = str.__format__

__all__ = ["StrEnum", "tomllib"]
