"""Feedback: the true label or value of a served prediction, posted later by its id.

Body forms (``POST /v1/models/<m>/feedback``)::

    {"id": "3f9a0c1e-17", "label": 7}                 one sample (a request of batch 1)
    {"id": "3f9a0c1e-17", "label": "seven"}           a class by its name (manifest labels)
    {"id": "3f9a0c1e-17", "labels": [7, 1, 0]}        every sample of a batched request
    {"id": "3f9a0c1e-17", "index": 2, "label": 0}     one sample of a batched request
    {"id": "3f9a0c1e-17", "value": 21.5}              regression ("values" for a batch)
    {"items": [ ...any of the above... ]}             a batch, e.g. labelled later offline

Each item is ``accepted``, ``unknown`` (no such prediction: never served here, or evicted),
``duplicate`` (already labelled: counted once) or ``invalid`` (with the reason).
Parsing and judging are pure; :mod:`agent.quality.hub` does the lookups and the writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.agent.quality.store import Row, VersionMeta

MAX_ITEMS = 10_000
MAX_LABELS_PER_ITEM = 1024
_ID_RE = re.compile(r"^([0-9a-f]{8})-([0-9]{1,18})$")


class FeedbackError(EdgeshipError):
    """The body as a whole is unusable (400)."""

    reason_code = Reason.BAD_REQUEST


@dataclass(frozen=True)
class Item:
    """One posted item, parsed: the samples it names and their truths (None: invalid)."""

    id: str
    boot: str = ""
    first: int = 0           # the request's first sample
    index: int | None = None  # one sample of the request
    truths: tuple[Any, ...] = ()
    whole: bool = False       # "labels"/"values": every sample of the request
    error: str | None = None

    @property
    def samples(self) -> list[int]:
        if self.whole:
            return list(range(self.first, self.first + len(self.truths)))
        return [self.first + (self.index or 0)]


def parse_body(doc: Any) -> list[Item]:
    if not isinstance(doc, dict):
        raise FeedbackError("feedback must be a JSON object")
    raw = doc["items"] if "items" in doc else [doc]
    if not isinstance(raw, list) or not raw:
        raise FeedbackError('"items" must be a non-empty list')
    if len(raw) > MAX_ITEMS:
        raise FeedbackError(f"{len(raw)} items: at most {MAX_ITEMS} per request")
    return [parse_item(x) for x in raw]


def parse_item(raw: Any) -> Item:
    if not isinstance(raw, dict):
        return Item("", error="an item must be an object")
    raw_id = raw.get("id")
    m = _ID_RE.match(raw_id) if isinstance(raw_id, str) else None
    if m is None:
        return Item(str(raw_id)[:80], error='"id" must be a request id as the agent returned it')
    rid = m.group(0)
    base = Item(rid, boot=m.group(1), first=int(m.group(2)))
    single = [k for k in ("label", "value") if k in raw]
    multi = [k for k in ("labels", "values") if k in raw]
    if len(single) + len(multi) != 1:
        return _bad(base, 'give exactly one of "label", "value", "labels", "values"')
    if multi:
        truths = raw[multi[0]]
        if not isinstance(truths, list) or not 0 < len(truths) <= MAX_LABELS_PER_ITEM:
            return _bad(base, f'"{multi[0]}" must be a list of 1..{MAX_LABELS_PER_ITEM}')
        if "index" in raw:
            return _bad(base, f'"index" goes with "label"/"value", not "{multi[0]}"')
        return Item(rid, base.boot, base.first, None, tuple(truths), whole=True)
    index = raw.get("index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)
                              or not 0 <= index < MAX_LABELS_PER_ITEM):
        return _bad(base, f'"index" must be an integer 0..{MAX_LABELS_PER_ITEM - 1}')
    return Item(rid, base.boot, base.first, index, (raw[single[0]],))


def _bad(item: Item, why: str) -> Item:
    return Item(item.id, item.boot, item.first, error=why)


def truth_of(value: Any, meta: VersionMeta) -> float | int | str:
    """The truth as a class index or a number; a str is the reason it is not valid."""
    if isinstance(value, bool):
        return "a label must be a class index, a class name or a number, not a boolean"
    if meta.task == "classification":
        if isinstance(value, str):
            if value in meta.labels:
                return meta.labels.index(value)
            return f"unknown class name {value[:60]!r}"
        if isinstance(value, int) and 0 <= value < meta.classes:
            return value
        return f"class must be 0..{meta.classes - 1} or a class name, got {str(value)[:60]}"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return f"value must be a finite number, got {str(value)[:60]}"


def check_rows(item: Item, rows: dict[int, Row]) -> str | None:
    """Why ``item`` cannot be applied to the stored ``rows`` (None: it can), as
    ``"unknown: ..."``, ``"duplicate: ..."`` or ``"invalid: ..."``."""
    wanted = item.samples
    first = rows.get(item.first)
    if first is None or first.request != item.first:
        return "unknown: no prediction with this id on this device (never served here, " \
               "or evicted)"
    size = sum(1 for r in rows.values() if r.request == item.first)  # of those looked up
    if item.whole and len(wanted) != size:
        more = "more than " if size > len(wanted) else ""
        return f"invalid: the request has {more}{min(size, len(wanted))} sample(s), " \
               f"got {len(wanted)} labels"
    if not item.whole and item.index is None and size > 1:
        return "invalid: the request has several samples: send \"labels\" or an \"index\""
    if any(rows.get(s) is None or rows[s].request != item.first for s in wanted):
        return f"invalid: index {item.index} is beyond the request's samples"
    if any(rows[s].labelled for s in wanted):
        return "duplicate: already labelled (counted once)"
    if any(rows[s].predicted is None for s in wanted):
        return "invalid: no class or value was recorded for this prediction"
    return None


def lookup_samples(items: Sequence[Item]) -> list[int]:
    """Sample ids to fetch for ``items``: each named sample, plus the next one of a
    request to learn where the request ends."""
    wanted: set[int] = set()
    for item in items:
        if item.error is None:
            samples = item.samples
            wanted.update(samples)
            wanted.add(samples[-1] + 1)
            wanted.add(item.first)
    return sorted(wanted)


STATUS_HTTP = {"accepted": 200, "unknown": 404, "duplicate": 409, "invalid": 400}
