"""Machine-readable JSON report, described by ``report.schema.json`` (JSON Schema draft 2020-12)."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import checks
from checks.report import REPORT_SCHEMA, Report

SCHEMA_FILE = "report.schema.json"


def iso_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with a ``Z`` suffix; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _strict(data: Any) -> Any:
    """Replace NaN and infinities (which strict JSON cannot carry) with null, recursively."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _strict(val) for key, val in data.items()}
    if isinstance(data, (list, tuple)):
        return [_strict(val) for val in data]
    return data


def to_json_dict(report: Report) -> dict[str, Any]:
    """The report as a JSON-ready dict (see ``report.schema.json``). Non-finite floats become null."""
    return {
        "schema": REPORT_SCHEMA,
        "peftnode_version": checks.__version__,
        "host": dict(report.host),
        "stack": dict(report.stack),
        "started_at": iso_utc(report.started_at),
        "finished_at": iso_utc(report.finished_at),
        "duration_s": round(report.duration_s, 6),
        "options": dict(report.options),
        "status": report.status.label,
        "exit_code": report.exit_code,
        "counts": report.counts(),
        "blocked_by": report.blocked_by(),
        "results": [_strict(r.to_dict()) for r in report.results],
    }


def _default(obj: Any) -> Any:
    # Probes may hand back values json cannot encode (paths, sets, enums); make them readable.
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def dumps(report: Report) -> str:
    return json.dumps(to_json_dict(report), indent=2, default=_default, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(report: Report, path: str | os.PathLike) -> Path:
    """Write the JSON report to ``path`` (``-`` is not special here) and return the path."""
    target = Path(path)
    target.write_text(dumps(report), encoding="utf-8")
    return target


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return (Path(__file__).with_name(SCHEMA_FILE)).read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The JSON Schema of the report document (a fresh dict each call)."""
    return json.loads(_schema_text())
