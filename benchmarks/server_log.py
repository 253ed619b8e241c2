"""What the server's log lines say: faces and stage ms per image, device and setup seconds.

predict.py reports these figures only in its log, which Cog returns with each prediction
(``logs``) and the server writes to its own log (the setup line).
"""

from __future__ import annotations

import re
from typing import Any

# The client reads two of predict.py's log lines (the only place these figures are reported):
# one per image: "images[0] (file.jpg): 470x192, faces found=3 kept=1, ..."
FACES_LINE = re.compile(
    r"images\[(?P<index>\d+)\] \(.*?\): \d+x\d+, faces found=(?P<found>\d+) kept=(?P<kept>\d+)"
    r"(?:, (?P<stages>(?:\w+=\d+ms ?)+), total=\d+ms)?"  # "..., read_decode=12ms detect=40ms .., total=90ms"
)
STAGE_MS = re.compile(r"(?P<stage>\w+)=(?P<ms>\d+)ms")
# and one at the end of setup: "setup: device=cpu dtype=float32 (...) load=2792ms warmup=45546ms ..."
SETUP_LINE = re.compile(
    r"setup: device=(?P<device>\S+) .*?load=(?P<load_ms>\d+)ms warmup=(?P<warmup_ms>\d+)ms"
)


def parse_faces(logs: str, count: int) -> tuple[list[int | None], list[int | None]]:
    """Faces found and kept per image of a request, from predict.py's per-image log lines."""
    found: list[int | None] = [None] * count
    kept: list[int | None] = [None] * count
    for match in FACES_LINE.finditer(logs):
        index = int(match["index"])
        if index < count:
            found[index], kept[index] = int(match["found"]), int(match["kept"])
    return found, kept


def parse_stage_ms(logs: str, count: int) -> list[dict[str, float]]:
    """Per image of a request, the server's stage -> ms (whole ms, as logged); {} where not logged."""
    stages: list[dict[str, float]] = [{} for _ in range(count)]
    for match in FACES_LINE.finditer(logs):
        index = int(match["index"])
        if index < count and match["stages"]:
            stages[index] = {m["stage"]: float(m["ms"]) for m in STAGE_MS.finditer(match["stages"])}
    return stages


def setup_info(server_log: str) -> dict[str, Any]:
    """Device and setup seconds from the predictor's setup log line, when present."""
    match = SETUP_LINE.search(server_log)
    if match is None:
        return {}
    return {
        "device": match["device"],
        "setup_load_s": int(match["load_ms"]) / 1000.0,
        "setup_warmup_s": int(match["warmup_ms"]) / 1000.0,
    }
