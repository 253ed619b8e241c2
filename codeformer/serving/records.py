"""The server's structured log records: per request a ``request_admitted {json}`` line when
its work starts and a ``request_timings {json}`` line when it ends, and one
``setup_timings {json}`` line per server start; how they are written and read back.

``codeformer.serving.request`` writes the per-request records (admitted: images, pixels,
pixels in flight, admission wait; timings: faces and stage ms per image, admission wait,
wall time, forwards shared with other requests, options); ``predict.py``'s ``setup()``
writes the set-up one. Cog returns a prediction's lines with it (``logs``) and the server
also writes them to its own log. The benchmarks and the tests read these records, never
the prose lines beside them.
"""

from __future__ import annotations

import json
from typing import Any

TIMINGS_MARKER = "request_timings"
ADMITTED_MARKER = "request_admitted"
SETUP_MARKER = "setup_timings"


def record_line(marker: str, record: dict[str, Any]) -> str:
    """``<marker> {json}`` on one line (JSON escapes newlines): how a record is logged."""
    return f"{marker} {json.dumps(record, separators=(',', ':'))}"


def _log_message(line: str) -> str:
    """The message of one log line. The server's own log (coglet) writes each line as a JSON
    object whose ``fields.message`` holds the worker's line, quotes escaped; a prediction's
    ``logs`` hold the worker's lines as they are."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        fields = entry.get("fields") if isinstance(entry, dict) else None
        message = fields.get("message") if isinstance(fields, dict) else None
        return message if isinstance(message, str) else ""
    return line


def read_records(text: str, marker: str) -> list[dict[str, Any]]:
    """Every ``<marker> {json}`` record in ``text`` (a prediction's logs or the server's own
    log), in order; whatever precedes the marker on its line (level, logger) is ignored."""
    records = []
    for line in text.splitlines():
        if marker not in line:
            continue
        _, found, rest = _log_message(line).partition(f"{marker} {{")
        if found:
            records.append(json.loads("{" + rest))
    return records


def image_records(logs: str, count: int) -> list[dict[str, Any] | None]:
    """Per image of one request (``count`` images), its record from the request's
    ``request_timings`` line (the last in ``logs``); None for each when there is no line."""
    records = read_records(logs, TIMINGS_MARKER)
    images = records[-1]["images"] if records else []
    return [images[index] if index < len(images) else None for index in range(count)]


def setup_info(server_log: str) -> dict[str, Any]:
    """Device and setup seconds from the predictor's ``setup_timings`` record, when present."""
    records = read_records(server_log, SETUP_MARKER)
    if not records:
        return {}
    return {
        "device": records[-1]["device"],
        "setup_load_s": records[-1]["load_ms"] / 1000.0,
        "setup_warmup_s": records[-1]["warmup_ms"] / 1000.0,
    }
