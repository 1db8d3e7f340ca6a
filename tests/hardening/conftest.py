from __future__ import annotations

from tests.fleet.conftest import repo  # noqa: F401  (keys + initialised repository)
