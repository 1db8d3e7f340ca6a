"""Put on ``PYTHONPATH`` by tests/install/test_bad_models.py for the health-check child it
makes crash: when ``EDGESHIP_TEST_SEGFAULT_SHA`` is set, loading a model file whose sha256
starts with it ends this process with a real SIGSEGV (a NULL dereference), the way a model
that crashes the runtime would. Python imports this file at start-up (``site``); nothing of
it is in the product, and without the variable it does nothing."""

import os

_PREFIX = os.environ.get("EDGESHIP_TEST_SEGFAULT_SHA", "")

if _PREFIX:
    import ctypes
    import hashlib

    import edgeship.agent.runtime as _runtime

    _load = _runtime.load_runtime

    def _crashing_load(kind, path, **kwargs):
        runtime = _load(kind, path, **kwargs)
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest().startswith(_PREFIX):
                ctypes.string_at(0)  # dereference NULL: a real SIGSEGV
        return runtime

    _runtime.load_runtime = _crashing_load
