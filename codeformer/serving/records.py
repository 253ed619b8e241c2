"""The server's structured log record: one ``setup_timings {json}`` line per server start
(``predict.py``'s ``setup()``); how it is written and read back.

It belongs to no prediction, so it cannot travel as one's metrics: the server writes it to
its own log, where the benchmarks read it (``benchmarks.load.setup_info``), never the prose
line beside it.
A request's figures are its prediction's metrics (``codeformer.serving.request``).
"""

from __future__ import annotations

import json
from typing import Any

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
