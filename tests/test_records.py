"""The server's structured log record: written on one line, read back from either log."""

from __future__ import annotations

import json

from codeformer.serving.records import SETUP_MARKER, read_records, record_line


def test_a_record_is_one_line_and_reads_back_equal() -> None:
    record = {"device": "cpu", "note": "two\nlines", "load_ms": 12.5}
    line = record_line(SETUP_MARKER, record)
    assert "\n" not in line and line.startswith(f"{SETUP_MARKER} {{")
    # what precedes the marker on the line (level, logger) is ignored
    assert read_records(f"INFO codeformer.predict: {line}\n", SETUP_MARKER) == [record]


def test_records_are_read_in_order_from_coglets_json_lines_and_plain_lines() -> None:
    first, second = {"n": 1}, {"n": 2}
    wrapped = {"level": "INFO", "fields": {"message": f"INFO x: {record_line(SETUP_MARKER, first)}"}}
    text = "\n".join([json.dumps(wrapped), record_line(SETUP_MARKER, second)])
    assert read_records(text, SETUP_MARKER) == [first, second]


def test_lines_that_only_mention_the_marker_are_not_records() -> None:
    text = "\n".join(
        [
            f"INFO x: no {SETUP_MARKER} here",  # the marker without a JSON object after it
            '{"fields": {"message": 3}}',  # coglet's line without a text message
            "{not json " + SETUP_MARKER,  # a line that only looks like coglet's
            record_line("other_marker", {"n": 1}),
        ]
    )
    assert read_records(text, SETUP_MARKER) == []
