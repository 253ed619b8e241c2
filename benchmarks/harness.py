"""What the benchmark scripts and the tests share: ports, the local Cog server, weights, reports.

Every script runs by path, from any folder: ``python benchmarks/run_bench.py --help``. Python
then puts ``benchmarks/`` on ``sys.path`` (so ``import harness`` works) but not the project
root that holds ``codeformer/`` and ``predict.py``; importing this module adds the root, here
and nowhere else. A script therefore imports ``harness`` before any project module (isort
keeps it there: it sorts ``harness`` with the third-party imports, ahead of ``codeformer``).
pytest puts both folders on the path (``pythonpath`` in pyproject.toml), so the tests import
``harness`` and the scripts by the same names.

    with LocalServer({"CODEFORMER_WEIGHTS_DIR": str(weights)}) as server:
        result = server.client.predict({"images": [data_uri(photo)]})
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from codeformer.serving.client import CogClient, ServerError  # noqa: E402
from codeformer.serving.serve import DEFAULT_HOST, check_port_free, spawn_server, stop_server  # noqa: E402

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"  # git-ignored
PORT_ATTEMPTS = 3  # a free port can be taken between picking it and the server binding it
READY_POLL_S = 0.1  # start-to-READY is read at this resolution
RANDOM_WEIGHTS_FOLDER = "random-weights-seed0"
RANDOM_WEIGHTS_LABEL = "RANDOM weights (seed 0): timings are real, the restored faces are noise"


# -- ports -----------------------------------------------------------------------------------
def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((DEFAULT_HOST, 0))
        return probe.getsockname()[1]


def closed_port_url(name: str = "") -> str:
    """``http://127.0.0.1:<free port>/<name>``: a connection there is refused."""
    return f"http://{DEFAULT_HOST}:{free_port()}/{name}"


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
    ) -> None:
        self.env = dict(env or {})
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
                self.process = spawn_server(self.port, self.env, log_file)
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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so that ``finally`` blocks stop the server.

    SIGINT too: a process started from a non-interactive shell's background job inherits
    SIGINT ignored, and Python then installs no handler for it, so ``kill -INT`` would be lost.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# -- weights ---------------------------------------------------------------------------------
@contextlib.contextmanager
def random_weights_folder() -> Iterator[Path]:
    """Seed-0 random weights in the official formats, in a temporary folder removed on exit."""
    from codeformer.tools import random_weights  # imports torch: only where weights are written

    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        folder = Path(scratch) / RANDOM_WEIGHTS_FOLDER
        random_weights.write(folder, seed=0)
        yield folder


@dataclass(frozen=True)
class WeightsChoice:
    """What the server loads, as environment variables and as a label for the report."""

    env: dict[str, str]
    label: str
    random: bool

    def as_report(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "random": self.random,
            "env": {
                key: portable_path(value) if key.endswith("_DIR") else value
                for key, value in self.env.items()
            },
        }


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights-dir", type=Path, help="CODEFORMER_WEIGHTS_DIR for the server")
    weights.add_argument(
        "--random-weights", action="store_true", help="seed-0 random weights in a temp folder"
    )
    parser.add_argument("--weights-url", help="CODEFORMER_WEIGHTS_URL for the server (a mirror of the files)")


def choose_weights(args: argparse.Namespace, stack: contextlib.ExitStack) -> WeightsChoice:
    """The weights the flags of ``add_weights_arguments`` ask for; random ones live until ``stack`` closes."""
    if args.random_weights:
        folder = stack.enter_context(random_weights_folder())
        return WeightsChoice({"CODEFORMER_WEIGHTS_DIR": str(folder)}, RANDOM_WEIGHTS_LABEL, True)
    env: dict[str, str] = {}
    parts = []
    if args.weights_dir:
        env["CODEFORMER_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
        parts.append(f"folder {portable_path(args.weights_dir)}")
    if args.weights_url:
        env["CODEFORMER_WEIGHTS_URL"] = args.weights_url
        parts.append(f"downloaded from {args.weights_url}")
    return WeightsChoice(env, "weights: " + (", ".join(parts) or "the server's defaults"), False)


# -- reports ---------------------------------------------------------------------------------
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


def seconds(value: float | None, digits: int = 2) -> str:
    """A table cell: ``-`` where nothing was measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    ]
    header = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    return "\n".join([header, "-" * len(header), *lines])
