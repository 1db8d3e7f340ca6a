"""One tiny language model per session: trained in about a second, converted once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from tests.support.llm import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tinylm"))
