"""One exception hierarchy: every exception class the product defines derives from
``EdgeshipError`` (found statically, then imported and checked), and there is one
``TransitionError``."""

from __future__ import annotations

import ast
import importlib

from edgeship.agent.errors import EdgeshipError, TransitionError
from tests.packaging.test_import_cycles import product_modules


def _exception_classes() -> list[tuple[str, str]]:
    found = []
    for module, path in product_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                found.append((module, node.name))
    return found


def test_every_error_class_of_the_product_derives_from_the_one_root():
    classes = _exception_classes()
    assert len(classes) > 20  # the scan sees the product
    outside = [f"{m}.{name}" for m, name in classes
               if not issubclass(getattr(importlib.import_module(m), name), EdgeshipError)]
    assert outside == []


def test_there_is_one_transition_error():
    assert [m for m, name in _exception_classes() if name == "TransitionError"] == \
        ["edgeship.agent.errors"]
    from edgeship.fleet.rollout import TransitionError as rollout_error
    assert rollout_error is TransitionError
