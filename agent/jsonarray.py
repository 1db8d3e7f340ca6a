"""JSON bodies whose tensors cost memory in proportion to the tensor, not to Python objects.

``json.loads`` turns every number of a tensor into a Python float (24 bytes) plus a list slot
(8 bytes): a 16 MiB body of short numbers became ~580 MB of objects before NumPy saw it.
:func:`loads` parses the same documents, but every long JSON array made only of numbers
(nested or flat) is cut out of the text first and kept as a :class:`NumberArray`, a view of
its bytes. :meth:`NumberArray.to_array` then checks the array's grammar and regular shape
with a few vectorised passes over those bytes and parses the numbers straight into the
tensor's dtype. What is left (the request's small skeleton) goes through ``json.loads``.

Pure functions of bytes; errors are :class:`JsonTensorError` (a ``ValueError``) with a
reason a client can act on.
"""

from __future__ import annotations

import json
import re
import os
import warnings
from typing import Any

import numpy as np

from edgeship.agent.errors import InferenceInputError

#: bodies up to this size go to ``json.loads`` whole (fast; bounded amplification)
SMALL_BODY_BYTES = 256 * 1024
#: arrays of numbers at least this long (in characters) are cut out of larger bodies
LIFT_MIN_CHARS = 256
#: what may remain for ``json.loads`` once the arrays are cut out (objects, strings)
MAX_SKELETON_BYTES = 256 * 1024
#: deeper nesting than this is refused (tensors of higher rank are not served)
MAX_RANK = 32

_START = re.compile(rb'"(?:[^"\\]|\\.)*"|\[')

# character classes: 0 whitespace, 1 part of a number, 2 ',', 3 '[', 4 ']', 5 anything else
_SPACE, _NUM, _COMMA, _OPEN, _CLOSE, _BAD = range(6)
_CLASS = np.full(256, _BAD, np.uint8)
_CLASS[list(b" \t\r\n")] = _SPACE
_CLASS[list(b"0123456789eE+-.")] = _NUM
_CLASS[ord(",")], _CLASS[ord("[")], _CLASS[ord("]")] = _COMMA, _OPEN, _CLOSE
# which token may follow which, as the code 5 * previous + next
_FOLLOWS = np.zeros(25, bool)
for _a, _b in ((_OPEN, _OPEN), (_OPEN, _NUM), (_OPEN, _CLOSE), (_NUM, _COMMA),
               (_NUM, _CLOSE), (_COMMA, _NUM), (_COMMA, _OPEN), (_CLOSE, _COMMA),
               (_CLOSE, _CLOSE)):
    _FOLLOWS[5 * _a + _b] = True
# a list holding both numbers and lists: "1, [" or "], 1"
_MIXED = (25 * _NUM + 5 * _COMMA + _OPEN, 25 * _CLOSE + 5 * _COMMA + _NUM)
_TO_SPACES = bytes.maketrans(b",[]", b"   ")
_TO_CLASS = bytes(_CLASS)  # for bytes.translate: each byte to its class
_BLOCK = 1 << 20


class JsonTensorError(InferenceInputError, ValueError):
    """The body is not JSON, or an array in it is not a regular array of numbers.
    ``too_large``: the JSON besides the arrays of numbers exceeds ``MAX_SKELETON_BYTES``."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class NumberArray:
    """One JSON array of numbers (any nesting), still as text: views into the body and
    into its character classes."""

    __slots__ = ("text", "kinds")

    def __init__(self, text: memoryview, kinds: memoryview) -> None:
        self.text, self.kinds = text, kinds

    def __len__(self) -> int:
        return len(self.text)

    def shape_and_count(self) -> tuple[tuple[int, ...], int]:
        """The array's shape; JsonTensorError when its grammar is wrong or it is ragged."""
        return _structure(np.frombuffer(self.kinds, np.uint8))

    def to_array(self, dtype: np.dtype) -> np.ndarray:
        """The numbers parsed straight into ``dtype`` (float, integer or bool as 0/1),
        shaped as nested in the text."""
        shape, count = self.shape_and_count()
        dtype = np.dtype(dtype)
        out = np.empty(count, dtype)
        filled, at, end = 0, 0, len(self.text)
        while at < end:  # in blocks cut between numbers: no full-size copies of the text
            stop = min(end, at + _BLOCK)
            while stop < end and self.kinds[stop] == _NUM:
                stop += 1
            values = parse_numbers(bytes(self.text[at:stop]).translate(_TO_SPACES), dtype)
            if filled + values.size > count:
                raise JsonTensorError(f"expected {count} numbers, read more")
            out[filled:filled + values.size] = values
            filled, at = filled + values.size, stop
        if filled != count:
            raise JsonTensorError(f"expected {count} numbers, read {filled}")
        return out.reshape(shape)


def loads(body: bytes | memoryview) -> Any:
    """``json.loads(body)``; in bodies over ``SMALL_BODY_BYTES``, each array of numbers
    longer than ``LIFT_MIN_CHARS`` characters comes back as a :class:`NumberArray`, and
    what remains may be at most ``MAX_SKELETON_BYTES``."""
    data = bytes(body) if isinstance(body, memoryview) else body
    if len(data) <= SMALL_BODY_BYTES:
        return _json(data)
    kinds = data.translate(_TO_CLASS)
    pieces: list[Any] = []
    lifted: list[Any] = []
    pos, scan = 0, 0
    nonce = os.urandom(8).hex()  # a fresh key per body: a client cannot send it
    text, classes = memoryview(data), memoryview(kinds)
    while (m := _START.search(data, scan)) is not None:
        scan, start = m.end(), m.start()
        if data[start] != 0x5B:  # a string: skipped whole
            continue
        run_end = kinds.find(_BAD, start)
        run_end = len(data) if run_end < 0 else run_end
        end = _array_end(kinds, start, run_end)
        if end is None:  # holds more than numbers: left to json.loads, run and all
            scan = run_end
            continue
        if end - start < LIFT_MIN_CHARS:
            continue
        pieces += [data[pos:start], b'{"\\u0000%s":%d}' % (nonce.encode(), len(lifted))]
        lifted.append(NumberArray(text[start:end], classes[start:end]))
        pos = scan = end
    pieces.append(data[pos:])
    skeleton = b"".join(pieces)
    if len(skeleton) > MAX_SKELETON_BYTES:
        raise JsonTensorError(f"{len(skeleton)} bytes of JSON besides arrays of numbers "
                              f"(at most {MAX_SKELETON_BYTES}): send tensors as arrays of "
                              "numbers or as binary data", too_large=True)
    return _resolve(skeleton, lifted, "\x00" + nonce)


def _resolve(skeleton: bytes, lifted: list[NumberArray], key: str) -> Any:
    found: list[int] = []

    def hook(obj: dict[str, Any]) -> Any:
        if len(obj) == 1 and key in obj:
            found.append(obj[key])
            return lifted[obj[key]]
        return obj

    doc = _json(skeleton, object_hook=hook) if lifted else _json(skeleton)
    if sorted(found) != list(range(len(lifted))):
        raise JsonTensorError("body is not valid JSON")  # an array cut out of a bad place
    return doc


def _json(data: bytes, **kwargs: Any) -> Any:
    try:
        return json.loads(data, **kwargs)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise JsonTensorError(f"body is not JSON: {str(e)[:200]}") from e
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise JsonTensorError(f"body is not usable JSON: {str(e)[:200]}") from e


def _array_end(kinds: bytes, start: int, stop: int) -> int | None:
    """End (exclusive) of the array opening at ``start`` if it closes before ``stop``
    (where its run of numbers, commas, brackets and whitespace ends); in blocks, so the
    depth count stays small."""
    depth = 0
    for at in range(start, stop, _BLOCK):
        span = np.frombuffer(kinds, np.uint8, min(_BLOCK, stop - at), at)
        where = np.flatnonzero(span >= _OPEN)
        level = np.cumsum(np.where(span[where] == _OPEN, 1, -1), dtype=np.int64) + depth
        closes = np.flatnonzero(level == 0)
        if closes.size:
            return at + int(where[closes[0]]) + 1
        depth = int(level[-1]) if level.size else depth
    return None


def _tokens(cls: np.ndarray) -> np.ndarray:
    """The token kinds in order: each number once, each comma and bracket (in blocks, so
    the temporaries stay small)."""
    parts, prev_num = [], False
    for at in range(0, cls.size, _BLOCK):
        block = cls[at:at + _BLOCK]
        if (block == _BAD).any():
            raise JsonTensorError("array holds something other than numbers")
        is_num = block == _NUM
        keep = block >= _COMMA
        keep[0] |= is_num[0] and not prev_num
        keep[1:] |= np.greater(is_num[1:], is_num[:-1])  # a number starts after a non-number
        parts.append(block[keep])
        prev_num = bool(is_num[-1])
    return np.concatenate(parts)


def _check_grammar(kind: np.ndarray) -> None:
    """Which token may follow which, and no list holding both numbers and lists (in
    blocks overlapping by two tokens)."""
    if kind.size < 2 or kind[0] != _OPEN or kind[-1] != _CLOSE:
        raise JsonTensorError("malformed array of numbers")
    for at in range(0, kind.size - 1, _BLOCK):
        part = kind[at:at + _BLOCK + 2]
        code = part[:-1] * np.uint8(5)
        code += part[1:]
        if not _FOLLOWS[code].all():
            raise JsonTensorError("malformed array of numbers")
        code3 = part[:-2] * np.uint8(25)
        code3 += part[1:-1] * np.uint8(5)
        code3 += part[2:]
        if (code3 == _MIXED[0]).any() or (code3 == _MIXED[1]).any():
            raise JsonTensorError("ragged array: a list holds both numbers and lists")


def _structure(cls: np.ndarray) -> tuple[tuple[int, ...], int]:
    kind = _tokens(cls)
    _check_grammar(kind)
    brackets = kind[kind >= _OPEN]
    depth = np.cumsum(np.where(brackets == _OPEN, 1, -1), dtype=np.int32)
    if depth[-1] != 0 or (depth[:-1] <= 0).any():
        raise JsonTensorError("malformed array of numbers")
    open_depth = depth[brackets == _OPEN]  # the level of each list, in document order
    rank = int(open_depth.max())
    if rank > MAX_RANK:
        raise JsonTensorError(f"array nested deeper than {MAX_RANK}")
    opens = np.flatnonzero(kind == _OPEN)
    holds_numbers = kind[opens + 1] == _NUM
    if (open_depth[holds_numbers] != rank).any():
        raise JsonTensorError("ragged array: numbers at different depths")
    shape = [_children(open_depth, level) for level in range(1, rank)]
    closes = np.flatnonzero(kind == _CLOSE)
    inner = opens[open_depth == rank]
    lengths = (closes[np.searchsorted(closes, inner)] - inner) // 2  # "[1,2,3]": 6 // 2
    if (lengths != lengths[0]).any():
        raise JsonTensorError("ragged array: rows of different lengths")
    shape.append(int(lengths[0]))
    return tuple(shape), int(np.count_nonzero(kind == _NUM))


def _children(open_depth: np.ndarray, level: int) -> int:
    """How many lists each list at ``level`` holds (the same for all, else ragged)."""
    parents = np.flatnonzero(open_depth == level)
    children = np.flatnonzero(open_depth == level + 1)
    counts = np.bincount(np.searchsorted(parents, children) - 1, minlength=parents.size)
    if (counts != counts[0]).any():
        raise JsonTensorError("ragged array: rows of different lengths")
    return int(counts[0])


_INT64_MAX = np.iinfo(np.int64).max


def parse_numbers(text: bytes, dtype: np.dtype) -> np.ndarray:
    """Whitespace-separated numbers parsed for ``dtype`` (floats as float64, integers as
    int64 or uint64, range-checked; bools as 0/1): integer and bool dtypes take integers
    only, floats anything numeric."""
    if not text.strip():
        return np.empty(0, dtype)
    try:
        if dtype.kind == "f":
            values = _fromstring(text, np.float64)
        else:
            values = _parse_integers(text, dtype)
    except ValueError as e:
        raise JsonTensorError(f"not a list of {dtype} numbers: {e}") from e
    return values


def _fromstring(text: bytes, dtype: Any) -> np.ndarray:
    """``np.fromstring(sep=" ")`` that refuses text it cannot read to its end: NumPy < 2.1
    (Debian's 1.24, the last for Python 3.9) only warns and returns what it read so far."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=dtype, sep=" ")  # noqa: NPY201
        except DeprecationWarning as e:
            raise ValueError(str(e)) from None


def _parse_integers(text: bytes, dtype: np.dtype) -> np.ndarray:
    if dtype.kind not in "iub":
        raise ValueError(f"dtype {dtype} does not hold numbers")
    if re.search(rb"[.eE]", text):
        raise ValueError("a number with a fraction or exponent where integers are expected")
    wide = np.uint64 if dtype == np.uint64 else np.int64
    values = _fromstring(text, wide)
    if wide is np.int64 and values.size and (
            values.max() == _INT64_MAX or values.min() == -_INT64_MAX - 1):
        _check_int64_range(text)
    if dtype.kind == "b":
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError("bool values must be 0 or 1 (or true/false)")
        return values != 0
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(f"a value outside [{info.min}, {info.max}]")
    return values


def _check_int64_range(text: bytes) -> None:
    """fromstring saturates at the int64 limits: find a token that really lies beyond."""
    for token in re.finditer(rb"[+-]?\d{19,}", text):
        try:
            value = int(token.group())
        except ValueError:  # more digits than Python will convert
            raise ValueError("an integer with too many digits") from None
        if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise ValueError(f"{token.group()[:30].decode()}… is outside int64")


def as_array(value: Any, dtype: np.dtype | str, what: str) -> np.ndarray:
    """A JSON value (a :class:`NumberArray`, a nested list, or a scalar) as an array of
    ``dtype``, with the same rules for both: integers for integer dtypes, true/false or
    0/1 for bool, no strings."""
    dtype = np.dtype(dtype)
    if isinstance(value, NumberArray):
        try:
            return value.to_array(dtype)
        except JsonTensorError as e:
            raise JsonTensorError(f"{what}: {e}") from None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise JsonTensorError(f"{what} is not a regular array: {str(e)[:200]}") from e
    kind = arr.dtype.kind
    if kind not in "biuf" or (kind == "f" and dtype.kind in "iub") or \
            (kind in "iuf" and dtype.kind == "b" and arr.size and
             not np.isin(arr, (0, 1)).all()):
        raise JsonTensorError(f"{what}: {_describe(arr)} cannot be read as {dtype}")
    if kind in "iu" and dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise JsonTensorError(f"{what}: a value outside [{info.min}, {info.max}]")
    return arr.astype(dtype, copy=False)


def _describe(arr: np.ndarray) -> str:
    if arr.dtype.kind == "O":
        return "a ragged or mixed array"
    return {"U": "strings", "S": "strings", "f": "floats", "b": "booleans"}.get(
        arr.dtype.kind, f"{arr.dtype} values")
