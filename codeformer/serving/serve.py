"""Run the real Cog prediction server locally, exactly as the Cog image runs it.

    python -m codeformer.serving.serve --port 5000 [--host 127.0.0.1]

Writes ``.cog/openapi_schema.json`` (so that the server validates inputs as in the image),
sets what ``cog build`` would bake into the image (``COG_PREDICT_TYPE_STUB``,
``COG_MAX_CONCURRENCY`` from ``@cog.concurrent`` on ``Predictor.run``), then runs Cog's
server (coglet) in this process, in the foreground: one process and one port, with coglet's
worker as its child, as in the image. Two things differ from the image, both at the end of
its life (``ReplicaWatch``): SIGTERM drains before coglet stops (new predictions fail, the
running ones finish and reach their caller), and the server exits with ``EXIT_WORKER_GONE``
when coglet's worker is gone, for a supervisor to start a new one. Ctrl-C stops coglet at
once. The worker removes its output folders as it exits; any folder of a worker that was
killed is removed when the server returns. Environment variables (``CODEFORMER_*``) pass
through to the predictor.
The API is Cog's: ``GET /health-check``, ``POST /predictions``,
``POST /predictions/{id}/cancel``, ``GET /openapi.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from codeformer.config import PROJECT_ROOT
from codeformer.errors import ConfigError
from codeformer.serving.client import SETUP_FAILED
from codeformer.serving.lifecycle import (
    WEBHOOK_SETTLE_S,
    drain,
    health_status,
    remove_orphaned_slot_folders,
    request_shutdown,
    shutdown_grace_s,
)
from codeformer.serving.outputs import remove_orphaned_output_dirs
from codeformer.serving.schema import DEFAULT_PREDICTOR_REF, write_schema

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# seconds a server started by spawn_server gets after SIGTERM (and its drain): coglet gives its worker 10 s
STOP_GRACE_S = 20.0
WORKER_MARKER = b"_run_worker"  # coglet starts its worker as `python -c "...coglet.server._run_worker()"`
WATCH_INTERVAL_S = 0.5  # how often serve() looks for SIGTERM and for its worker
EXIT_WORKER_GONE = 70  # EX_SOFTWARE, as a worker that hit a sticky CUDA error exits
EXIT_DRAIN_TIMEOUT = 75  # EX_TEMPFAIL: stopped with predictions still running


def runner_concurrency(predictor_ref: str = DEFAULT_PREDICTOR_REF) -> int:
    """``max`` of ``@cog.concurrent`` on the predictor's ``run`` (1 without it).

    That is where Cog reads a model's concurrency: the build turns it into
    ``COG_MAX_CONCURRENCY`` for coglet, and ``main`` does the same for the local server.
    """
    file_name, _, class_name = predictor_ref.partition(":")
    path = PROJECT_ROOT / file_name
    spec = importlib.util.spec_from_file_location(Path(file_name).stem, path)
    if spec is None or spec.loader is None or not class_name:
        raise ConfigError(f"predictor reference {predictor_ref!r}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = getattr(module, class_name).run
    return int(getattr(run, "__cog_concurrent_max__", 1))


def check_port_free(host: str, port: int) -> None:
    """Raise ``ConfigError`` naming the port when something already listens on it."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # the server binds with SO_REUSEADDR too: a port in TIME_WAIT is usable, one with a listener is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another server running?); "
                f"stop it or pick another port with --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def image_environment(predictor_ref: str, base_env: Mapping[str, str]) -> dict[str, str]:
    """``base_env`` plus what the Cog image sets for coglet and its worker."""
    env = dict(base_env)
    env["COG_PREDICT_TYPE_STUB"] = predictor_ref
    env.setdefault("COG_MAX_CONCURRENCY", str(runner_concurrency(predictor_ref)))
    # coglet starts its worker as plain `python` from PATH; put this interpreter's folder
    # first so the worker sees the same virtualenv (and finds coglet and torch)
    interpreter_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([interpreter_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    # predict.py imports the codeformer package from the project root
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spawn_server(
    port: int,
    extra_env: Mapping[str, str],
    log_file: IO[bytes],
    predictor_ref: str = DEFAULT_PREDICTOR_REF,
) -> subprocess.Popen[bytes]:
    """Start ``python -m codeformer.serving.serve --port PORT --predictor REF`` in its own
    process group, output to a file.

    Benchmarks and tests run the server this way; ``stop_server`` ends it.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "codeformer.serving.serve", "--port", str(port), "--predictor", predictor_ref],
        cwd=PROJECT_ROOT,
        env={**os.environ, **extra_env},
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, apart from the test's or benchmark's
    )


def stop_server(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """End a server started by ``spawn_server``: SIGTERM to coglet, then SIGKILL to its group.

    The SIGTERM goes to coglet alone, as an orchestrator sends it: coglet stops its worker,
    whose exit handlers remove its output folders. Whatever is left after ``grace_s`` is killed.
    """
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace_s)


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


def local_url(host: str, port: int) -> str:
    """The URL this machine reaches a server listening on ``host:port`` at."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def remove_leftovers() -> None:
    """Remove the folders of workers that no longer run, with coglet's folders of their predictions."""
    removed = remove_orphaned_output_dirs() + remove_orphaned_slot_folders()
    logger.info("stopped; removed %d folder(s) the worker and coglet left", removed)
    logging.shutdown()


class ReplicaWatch:
    """The thread beside coglet: SIGTERM starts a drain; a worker gone after setup stops the server.

    ``status`` is the server's exit status once coglet has returned.
    """

    def __init__(self, url: str, grace_s: float) -> None:
        self.url = url
        self.grace_s = grace_s
        self.status = 0
        self.sigterm = threading.Event()
        self.worker: int | None = None
        self._worker_exit: int | None = None  # a pidfd of the worker: readable once it exits

    def _wait_a_moment(self) -> bool:
        """Wait ``WATCH_INTERVAL_S``, or less when the worker exits; whether SIGTERM came.

        Woken by the worker's exit at once (a pidfd), the server stops before coglet, with no
        worker, answers 409 to the requests that follow.
        """
        if self._worker_exit is None:
            return self.sigterm.wait(WATCH_INTERVAL_S)
        select.select([self._worker_exit], [], [], WATCH_INTERVAL_S)
        return self.sigterm.is_set()

    def wait_for_sigterm(self) -> None:
        signal.sigwait({signal.SIGTERM})  # blocked in every thread: it waits here for this one
        self.sigterm.set()

    def watch(self) -> None:
        while not self._wait_a_moment():
            current = find_worker_pid(os.getpid())
            if self.worker is None:
                self.worker = current
                if current is not None:
                    with contextlib.suppress(OSError):  # no pidfd (Linux before 5.3): polling alone
                        self._worker_exit = os.pidfd_open(current)
            elif current != self.worker and health_status(self.url) == SETUP_FAILED:
                # a worker whose setup failed may exit: the server stays, to report SETUP_FAILED
                if self._worker_exit is not None:
                    os.close(self._worker_exit)  # readable for good now: back to plain polling
                    self._worker_exit = None
            elif current != self.worker:
                logger.error(
                    "coglet's worker (pid %d) is gone and coglet starts no other: stopping with "
                    "status %d so that a supervisor starts a new server",
                    self.worker,
                    EXIT_WORKER_GONE,
                )
                self.status = EXIT_WORKER_GONE
                # no graceful stop: with no worker, coglet answers every request with a failure
                # or 409, and what still runs is lost anyway; stop listening now
                remove_leftovers()
                os._exit(EXIT_WORKER_GONE)
        logger.info("SIGTERM: draining for up to %.0f s; new predictions fail", self.grace_s)
        left = drain(self.grace_s, owner_pid=self.worker) if self.worker is not None else 0
        if left:
            logger.error(
                "%d prediction(s) still running after %.0f s were stopped and failed", left, self.grace_s
            )
            self.status = EXIT_DRAIN_TIMEOUT
        time.sleep(WEBHOOK_SETTLE_S)
        request_shutdown(self.url)


def serve(host: str, port: int, predictor_ref: str, grace_s: float) -> int:
    """Run coglet for ``predictor_ref`` on ``host:port`` until it stops; returns the exit status.

    coglet runs with ``await_explicit_shutdown`` (it ignores SIGTERM and stops on
    ``POST /shutdown``), with SIGTERM blocked in every thread, so that Linux keeps it pending
    for ``ReplicaWatch``. On SIGTERM: ``drain`` (new predictions fail with
    ``ShuttingDownError``; running ones get ``grace_s`` to finish and reach their caller),
    then ``POST /shutdown``: 0, or ``EXIT_DRAIN_TIMEOUT`` when some had to be stopped (they
    are reported failed, naming the shutdown). When the worker
    is gone after setup (killed, out of memory, a sticky CUDA error), coglet would stay up
    without one, failing every request: the server stops with ``EXIT_WORKER_GONE`` so that a
    supervisor starts a new one. SIGINT (Ctrl-C) is coglet's: it stops at once.
    """
    import coglet

    os.environ.update(image_environment(predictor_ref, os.environ))
    os.environ["PORT"] = str(port)
    os.chdir(PROJECT_ROOT)  # coglet reads .cog/openapi_schema.json and predict.py from here
    # threads inherit the mask; coglet's worker does not (Rust's Command clears it)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    replica = ReplicaWatch(local_url(host, port), grace_s)
    for job in (replica.wait_for_sigterm, replica.watch):
        threading.Thread(target=job, name=job.__name__, daemon=True).start()
    coglet.server.serve(predictor_ref=predictor_ref, host=host, port=port, await_explicit_shutdown=True)
    return replica.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Cog prediction server for predict.py locally.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    parser.add_argument("--host", default=DEFAULT_HOST, help="default %(default)s (0.0.0.0 to listen on all)")
    parser.add_argument("--predictor", default=DEFAULT_PREDICTOR_REF, help="default %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_port_free(args.host, args.port)
        grace_s = shutdown_grace_s()
        write_schema(args.predictor)
    except (ConfigError, OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("starting the Cog server for %s on http://%s:%d", args.predictor, args.host, args.port)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        status = serve(args.host, args.port, args.predictor, grace_s)
    finally:
        remove_leftovers()
    return status


if __name__ == "__main__":
    sys.exit(main())
