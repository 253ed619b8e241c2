"""Where ``run()`` writes its JPGs: one temp folder per request, named after the process.

Cog reads a request's files right after ``run()`` returns. With concurrent predictions a
new request says nothing about when another slot's files were read, so ``OutputFolders``
keeps each folder ``OUTPUT_RETENTION_S`` after its request returned and removes it when a
later request starts; the worker removes the rest when it exits, and a folder whose process
is gone (killed, out of memory) is removed by the next server or worker to start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

OUTPUT_DIR_PREFIX = "codeformer-outputs-"
# seconds a request's folder outlives its answer: Cog reads the files within milliseconds
OUTPUT_RETENTION_S = 60.0


def new_output_dir(prefix: str = OUTPUT_DIR_PREFIX) -> Path:
    """A fresh folder ``<temp>/<prefix><pid>-XXXXXXXX`` (``codeformer-outputs-`` by default)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def owner_pid_alive(folder: Path, prefix: str = OUTPUT_DIR_PREFIX) -> bool:
    """Whether the process whose id follows ``prefix`` in ``folder``'s name (``new_output_dir``) runs."""
    owner = folder.name.removeprefix(prefix).split("-", 1)[0]
    return not owner.isdigit() or _pid_alive(int(owner))


def orphaned_dirs(temp_dir: Path | None = None, prefix: str = OUTPUT_DIR_PREFIX) -> list[Path]:
    """The ``new_output_dir(prefix)`` folders in ``temp_dir`` of processes that no longer run."""
    folders = (temp_dir or Path(tempfile.gettempdir())).glob(f"{prefix}*-*")
    return [folder for folder in folders if not owner_pid_alive(folder, prefix)]


def remove_orphaned_output_dirs(temp_dir: Path | None = None, prefix: str = OUTPUT_DIR_PREFIX) -> int:
    """Remove the ``new_output_dir`` folders of processes that no longer run; returns how many."""
    orphaned = orphaned_dirs(temp_dir, prefix)
    for folder in orphaned:
        shutil.rmtree(folder, ignore_errors=True)
    return len(orphaned)


class OutputFolders:
    """The output folders of this process's requests, removed once Cog has surely read them."""

    def __init__(self, retention_s: float = OUTPUT_RETENTION_S) -> None:
        self.retention_s = retention_s
        self._returned: list[tuple[float, Path]] = []  # (monotonic time the request returned, folder)
        self._lock = threading.Lock()

    def returned(self, folder: Path) -> None:
        """``folder``'s request has returned its files to Cog."""
        with self._lock:
            self._returned.append((time.monotonic(), folder))

    def discard_expired(self) -> None:
        """Remove the folders of requests that returned at least ``retention_s`` ago."""
        cutoff = time.monotonic() - self.retention_s
        with self._lock:
            expired = [folder for returned_at, folder in self._returned if returned_at <= cutoff]
            self._returned = [entry for entry in self._returned if entry[1] not in expired]
        for folder in expired:
            shutil.rmtree(folder, ignore_errors=True)

    def discard_all(self) -> None:
        with self._lock:
            folders = [folder for _, folder in self._returned]
            self._returned.clear()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
