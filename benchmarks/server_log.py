"""The server's structured log records: per-request timings and the setup figures.

``codeformer.serving.request`` logs one ``request_timings {json}`` line per request (faces
and stage milliseconds per image), and predict.py's ``setup`` one ``setup_timings {json}``
line. Cog returns a prediction's log lines with it (``logs``); the server also writes them to
its own log. The records are read here, so that no benchmark parses the prose lines.
"""

from __future__ import annotations

import json
from typing import Any

from codeformer.serving.request import SETUP_MARKER, TIMINGS_MARKER


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


def parse_faces(logs: str, count: int) -> tuple[list[int | None], list[int | None]]:
    """Faces found and kept per image of a request; None where the server did not say."""
    images = image_records(logs, count)
    return (
        [None if image is None else image["faces_found"] for image in images],
        [None if image is None else image["faces_kept"] for image in images],
    )


def parse_stage_ms(logs: str, count: int) -> list[dict[str, float]]:
    """Per image of a request, the server's stage -> ms; {} where not logged."""
    return [{} if image is None else dict(image["stages_ms"]) for image in image_records(logs, count)]


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
