"""``.npy`` and ``.npz`` bodies, read without trusting them: the header's shape must match
the bytes that follow (no allocation from a header alone), no pickled objects, and an
``.npz`` is bounded in members and in unpacked bytes before anything is unpacked."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from edgeship.agent.errors import InferenceInputError

NPY_TYPE = "application/x-npy"
NPZ_TYPE = "application/x-npz"
MAX_NPZ_MEMBERS = 64


def load_npy(data: bytes | memoryview, what: str = "body") -> np.ndarray:
    """An array over ``data`` (no copy): InferenceInputError unless it is a whole .npy."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise InferenceInputError(f"{what} is not a valid .npy array: {e}") from e
    if dtype.hasobject:
        raise InferenceInputError(f"{what}: .npy arrays of Python objects are refused")
    count = math.prod(shape)
    offset = f.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise InferenceInputError(f"{what}: .npy header says shape {list(shape)} of "
                                  f"{dtype} ({count * dtype.itemsize} bytes), "
                                  f"{len(data) - offset} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if not arr.flags.aligned:
        arr = arr.copy()
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def load_npz(data: bytes, max_unpacked_bytes: int) -> dict[str, np.ndarray]:
    """Name -> array for every ``NAME.npy`` member."""
    import zipfile  # .npz only: not kept in every agent's memory
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InferenceInputError(f"body is not a valid .npz archive: {e}") from e
    if len(members) > MAX_NPZ_MEMBERS:
        raise InferenceInputError(f".npz with {len(members)} members (at most "
                                  f"{MAX_NPZ_MEMBERS})")
    if sum(m.file_size for m in members) > max_unpacked_bytes:
        raise InferenceInputError(f".npz unpacks to more than {max_unpacked_bytes} bytes")
    arrays = {}
    for m in members:
        if not m.filename.endswith(".npy"):
            raise InferenceInputError(f".npz member {m.filename[:100]!r} is not NAME.npy")
        try:
            raw = archive.read(m)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InferenceInputError(f".npz member {m.filename[:100]!r}: {e}") from e
        arrays[m.filename[:-4]] = load_npy(raw, f".npz member {m.filename[:100]!r}")
    return arrays


def dump_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def dump_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    named: dict[str, Any] = {name: np.asarray(a) for name, a in arrays.items()}
    np.savez(buf, **named)
    return buf.getvalue()
