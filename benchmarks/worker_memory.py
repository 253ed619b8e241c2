"""The coglet worker's memory and faults, read from Linux /proc (benchmarks and tests).

``find_worker_pid`` finds the worker (where ``run()`` runs) below a server's pid; the
others read one figure of a process: resident and peak memory, minor page faults, open files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

WORKER_MARKER = b"_run_worker"  # coglet starts its worker as `python -c "...coglet.server._run_worker()"`


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


def find_worker_pid(server_pid: int) -> int | None:
    """The coglet worker (where run() runs) among the server's descendants, if it is up."""
    pending = [server_pid]
    while pending:
        pid = pending.pop()
        for child in child_pids(pid):
            with contextlib.suppress(OSError):
                if WORKER_MARKER in Path(f"/proc/{child}/cmdline").read_bytes():
                    return child
            pending.append(child)
    return None


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def minor_faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (field 10 of /proc/<pid>/stat)."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(after_name[7])  # fields from the 3rd on: state, ppid, pgrp, session, tty, tpgid, flags, minflt


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
