"""Where ``predict()`` writes its JPGs: one temp folder per request, named after the process.

Cog reads a request's files after ``predict()`` returns, so each request removes the folder
of the one before, the worker removes its last one when it exits, and a folder whose
process is gone (killed, out of memory) is removed by the next server or worker to start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

OUTPUT_DIR_PREFIX = "codeformer-outputs-"


def new_output_dir() -> Path:
    """A fresh folder ``<temp>/codeformer-outputs-<pid>-XXXXXXXX``."""
    return Path(tempfile.mkdtemp(prefix=f"{OUTPUT_DIR_PREFIX}{os.getpid()}-"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_orphaned_output_dirs(temp_dir: Path | None = None) -> int:
    """Remove the output folders of processes that no longer run; returns how many."""
    removed = 0
    for folder in (temp_dir or Path(tempfile.gettempdir())).glob(f"{OUTPUT_DIR_PREFIX}*-*"):
        owner = folder.name.removeprefix(OUTPUT_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _pid_alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
