"""What one client may spend of the device through the local API: connections, idle time and
request bodies, the body caps derived from each model's input size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from edgeship.agent.manifest import TensorSpec

MIB = 1024 * 1024
#: a JSON body may be this many times the model's binary cap (text per number is longer)
JSON_BODY_FACTOR = 4
#: room for the JSON header of a binary request, the .npz directory, names
HEADER_ROOM_BYTES = 64 * 1024
#: bodies of endpoints that take no tensors (and of unknown models)
SMALL_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class ApiLimits:
    max_connections: int = 32  # open connections per listener (TCP and Unix socket each)
    idle_timeout_s: float = 10.0  # a kept-alive connection waiting for its next request
    request_timeout_s: float = 30.0  # each read of a request's headers and body
    #: > 0: every model's body cap; 0: derived from the model's input size
    max_request_bytes: int = 0
    body_samples: int = 8  # derived cap: this many samples of the model's inputs
    min_body_bytes: int = 1 * MIB
    max_body_bytes: int = 256 * MIB  # no derived cap beyond this
    fallback_body_bytes: int = 16 * MIB  # inputs whose size depends on the request
    drain_max_bytes: int = 64 * MIB  # an oversized body read and dropped so the 413 arrives


@dataclass(frozen=True)
class BodyCaps:
    binary: int  # .npy, .npz, binary tensor data, gRPC messages
    json: int


def sample_bytes(specs: Sequence[TensorSpec]) -> int | None:
    """Bytes of one sample of every input (a dynamic dimension counts once, as the batch),
    or None when an input has more than one dynamic dimension (e.g. height and width)."""
    total = 0
    for spec in specs:
        if sum(d is None for d in spec.shape) > 1:
            return None
        try:
            itemsize = np.dtype(spec.dtype).itemsize
        except TypeError:
            return None
        total += itemsize * math.prod(d for d in spec.shape if d is not None)
    return total


@lru_cache(maxsize=256)
def body_caps(specs: Sequence[TensorSpec], limits: ApiLimits) -> BodyCaps:
    """The body caps for a model with inputs ``specs`` (a tuple: cached)."""
    if limits.max_request_bytes:
        return BodyCaps(limits.max_request_bytes, limits.max_request_bytes)
    per_sample = sample_bytes(specs)
    if per_sample is None:
        binary = limits.fallback_body_bytes
    else:
        binary = per_sample * limits.body_samples + HEADER_ROOM_BYTES
        binary = max(limits.min_body_bytes, min(limits.max_body_bytes, binary))
    return BodyCaps(binary, binary * JSON_BODY_FACTOR)
