from __future__ import annotations

import pytest

from edgeship.fleet.tuf_repo import init_repository


@pytest.fixture
def repo(tmp_path):
    """An initialised repository: returns (keys_dir, repo_dir)."""
    keys, repo_dir = tmp_path / "keys", tmp_path / "repo"
    init_repository(keys, repo_dir)
    return keys, repo_dir
