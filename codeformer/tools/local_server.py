"""The local Cog server as a child process group, for the tests and the benchmarks, and the
coglet worker's memory read from Linux ``/proc``.

    with LocalServer({"CODEFORMER_WEIGHTS_DIR": str(weights)}) as server:
        result = server.client.predict({"images": [data_uri(photo)]})
        worker = find_worker_pid(server.pid)

``LocalServer`` runs ``python -m codeformer.serving.serve`` (coglet and its worker, as the
image runs them) on a free 127.0.0.1 port and stops the whole group; ``find_worker_pid``
finds the worker (where ``run()`` runs) below the server; the others read one figure of a
process: resident and peak memory, minor page faults, open files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codeformer.serving.client import CogClient, ServerError
from codeformer.serving.schema import DEFAULT_PREDICTOR_REF
from codeformer.serving.serve import (  # noqa: F401  (find_worker_pid: for the tests and benchmarks)
    DEFAULT_HOST,
    check_port_free,
    find_worker_pid,
    spawn_server,
    stop_server,
)

PORT_ATTEMPTS = 3  # a free port can be taken between picking it and the server binding it
READY_POLL_S = 0.1  # start-to-READY is read at this resolution


# -- ports -----------------------------------------------------------------------------------
def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((DEFAULT_HOST, 0))
        return probe.getsockname()[1]


def closed_port_url(name: str = "") -> str:
    """``http://127.0.0.1:<free port>/<name>``: a connection there is refused."""
    return f"http://{DEFAULT_HOST}:{free_port()}/{name}"


# -- the test suites' environment ------------------------------------------------------------
def apply_suite_environment() -> None:
    """The settings every test run starts with (tests/ and benchmarks/tests); the servers and
    predictors the tests start inherit them.

    fast/max_speed run their bf16 path wherever oneDNN has bf16 kernels (AVX-512 BF16, AMX),
    also where they are slower than float32 and "auto" would turn them off (the auto decision
    has tests of its own); on a CPU without them (AVX2 only) bf16 convolutions are emulated,
    about 100x slower than float32, and "auto" picks float32 there as in production. The
    suites serve their files from 127.0.0.1, which production refuses to fetch from
    (``codeformer.serving.fetch``): the tests allow it, except the tests of that rule
    (tests/test_fetch.py), which turn it off.
    """
    from codeformer.runtime import cpu_has_bf16_kernels

    os.environ.setdefault("CODEFORMER_MIXED_PRECISION", "on" if cpu_has_bf16_kernels() else "auto")
    os.environ["CODEFORMER_ALLOW_PRIVATE_URLS"] = "1"


# The named groups of the tests (pyproject.toml's markers): what makes a test slow. A test in
# none of them is marked "quick" (``mark_quick``): ``./run.sh test -m quick``.
TEST_GROUPS = ("server", "parity", "nets", "process")


def mark_quick(items: list) -> None:
    """Mark the collected test ``items`` that are in no named group "quick" (a collection hook's job)."""
    import pytest

    for item in items:
        if not any(item.get_closest_marker(group) for group in TEST_GROUPS):
            item.add_marker(pytest.mark.quick)


# -- the local server ------------------------------------------------------------------------
class LocalServer:
    """``python -m codeformer.serving.serve`` (coglet and its worker) in its own process group, plus ``env``.

    ``port=None`` picks a free port (and another one if it is taken before the server binds
    it); a given port must be free, else ``start`` raises ``ConfigError``, so that a stale
    server never answers for a benchmark. ``start`` returns once ``/health-check`` says READY;
    ``stop`` (also run by the context manager) ends the whole group: coglet's worker process
    must not outlive the caller.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 600.0,
        predictor: str = DEFAULT_PREDICTOR_REF,
    ) -> None:
        self.env = dict(env or {})
        self.predictor = predictor  # the ``path.py:Class`` coglet serves
        self.fixed_port = port
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="cog-server-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.health: dict[str, Any] | None = None
        self.started_at: float | None = None  # time.monotonic() just before the process started
        self.start_to_ready_s: float | None = None
        self._client: CogClient | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return f"http://{DEFAULT_HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id (coglet's worker is a descendant: ``find_worker_pid``)."""
        if self.process is None:
            raise RuntimeError("the server is not running: call start() or use it as a context manager")
        return self.process.pid

    @property
    def client(self) -> CogClient:
        if self._client is None:
            raise RuntimeError("the server is not running: call start() or use it as a context manager")
        return self._client

    def log_text(self) -> str:
        """Everything the server and its worker wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, characters: int = 6000) -> str:
        return self.log_text()[-characters:]

    def start(self) -> LocalServer:
        attempts = 1 if self.fixed_port is not None else PORT_ATTEMPTS
        for attempt in range(attempts):
            self.port = self.fixed_port if self.fixed_port is not None else free_port()
            check_port_free(DEFAULT_HOST, self.port)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("wb") as log_file:  # the child keeps its own handle
                self.started_at = time.monotonic()
                self.process = spawn_server(self.port, self.env, log_file, self.predictor)
            self._client = CogClient(self.url)
            try:
                self.health = self._client.wait_until_ready(
                    self.ready_timeout_s, READY_POLL_S, process=self.process
                )
            except ServerError as exc:
                port_taken = self.process.poll() is not None and "already in use" in self.log_text()
                self.stop()
                if port_taken and attempt + 1 < attempts:
                    continue
                raise ServerError(f"{exc}\n--- server log ({self.log_path}) ---\n{self.log_tail()}") from exc
            self.start_to_ready_s = time.monotonic() - self.started_at
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def stop(self) -> None:
        """End the server's process group (SIGTERM, then SIGKILL after a grace period)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if self._client is not None:
            self._client.session.close()
        stop_server(process)

    def __enter__(self) -> LocalServer:
        started = False
        try:
            self.start()
            started = True
        finally:
            if not started:
                self.stop()  # a failed or interrupted start leaves no process behind
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- the worker's memory ---------------------------------------------------------------------
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
