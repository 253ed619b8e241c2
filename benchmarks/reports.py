"""What a benchmark report holds besides its figures: portable paths, the command, the machine.

A report may be shared or committed, so it names no machine:
``portable_path`` writes paths relative to the project, ``<temp>/name`` or ``.../name``, and
``command_line`` the script's arguments the same way. ``write_report`` writes atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codeformer.config import PROJECT_ROOT


def portable_path(path: str | Path) -> str:
    """A path as a committed report may hold it: relative to the project, else with no machine part.

    ``<temp>/name`` for the temp folder's contents, ``.../name`` elsewhere.
    """
    resolved = Path(path).resolve()
    if resolved.is_relative_to(PROJECT_ROOT):
        return resolved.relative_to(PROJECT_ROOT).as_posix()
    if resolved.is_relative_to(Path(tempfile.gettempdir()).resolve()):
        return f"<temp>/{resolved.name}"
    return f".../{resolved.name}"


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """The script's name and arguments (``sys.argv`` by default), absolute paths made portable."""

    def portable(arg: str) -> str:
        flag, equals, value = arg.partition("=")  # --output=/abs/path
        if equals and value.startswith("/"):
            return f"{flag}={portable_path(value)}"
        return portable_path(arg) if arg.startswith("/") else arg

    argv = sys.argv if argv is None else argv
    return [Path(argv[0]).name, *(portable(arg) for arg in argv[1:])]


def environment_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` as JSON to ``path`` atomically: a reader (or a killed run) sees a whole file.

    Scripts that write after each step (gpu_check.py) leave a whole file behind whenever they stop.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)
