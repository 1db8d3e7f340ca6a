"""The REST API's quality routes (read role; added to ``fleet.web.api.Api``):

    GET /api/v1/quality                  models with quality reports
    GET /api/v1/quality/<model>          per version: metrics from feedback (or "too few
                                         labels"), drift with its chance level, the
                                         label-free estimate (marked as one), and the
                                         drift/estimate series; ?group=&tag=&profile=
                                         choose a cohort, ?since_s= the window (3600),
                                         ?min_labels= the honesty bound (200)
"""

from __future__ import annotations

import math
import re
from typing import Any

from edgeship.fleet.auth import Role
from edgeship.fleet.quality import MIN_LABELLED
from edgeship.fleet.quality_store import quality_doc
from edgeship.fleet.web.api import Api, Request, Route
from edgeship.fleet.web.security import RequestError


def register(api: Api) -> None:
    def models(r: Request) -> dict[str, Any]:
        return {"models": sorted(api.registry.quality.models())}

    def model(r: Request) -> dict[str, Any]:
        q = r.query
        since_s = _number(q, "since_s", 3600.0)
        min_labels = int(_number(q, "min_labels", MIN_LABELLED))
        return quality_doc(api.registry, r.match.group(1), group=q.get("group") or None,
                           tag=q.get("tag") or None, profile=q.get("profile") or None,
                           since_s=since_s, min_labelled=max(1, min_labels))

    api.add(Route("GET", re.compile(r"/api/v1/quality"), Role.READ, models))
    api.add(Route("GET", re.compile(r"/api/v1/quality/([^/]+)"), Role.READ, model))


def _number(q: dict[str, str], key: str, default: float) -> float:
    try:
        value = float(q.get(key, default))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 1e9:
        raise RequestError(400, f"{key}: a positive number")
    return value


OPENAPI_PATHS = {
    "/api/v1/quality": ("Models with quality reports", []),
    "/api/v1/quality/{model}": (
        "Per version: accuracy, precision, recall, F1 from feedback with sample counts and "
        "intervals (or why not), drift per signal with its chance level, the label-free "
        "accuracy estimate (marked as one), drift and estimate over time",
        [("model", "string", "path"), ("group", "string", "query"),
         ("tag", "string", "query"), ("profile", "string", "query"),
         ("since_s", "number", "query"), ("min_labels", "integer", "query")]),
}
