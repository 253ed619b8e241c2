"""Run the real Cog prediction server locally, as ``cog serve`` would inside the image.

    python -m codeformer.serve --port 5000 [--host 127.0.0.1]

Writes ``.cog/openapi_schema.json`` (so that the server validates inputs), then runs
``python -m cog.server.http`` (coglet) with ``predict.py:Predictor`` from the project root
on a private loopback port, behind ``codeformer.front`` on the public one (which refuses
unknown input keys and strips coglet's error prefixes), in the foreground: Ctrl-C or
SIGTERM stops both, lets the worker remove its output folder, and removes any left. Environment
variables (``CODEFORMER_WEIGHTS_DIR``, ``CODEFORMER_WEIGHTS_URL``, ``CODEFORMER_MAX_*``)
pass through to the predictor. The API is the one of ``cog serve``: ``GET /health-check``,
``POST /predictions``, ``POST /predictions/{id}/cancel``, ``GET /openapi.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from codeformer.errors import ConfigError
from codeformer.front import BACKEND_HOST, Front
from codeformer.outputs import remove_orphaned_output_dirs
from codeformer.schema import DEFAULT_PREDICTOR_REF, PROJECT_ROOT, write_schema

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# seconds coglet gets after SIGTERM to finish and stop its worker (it kills the worker
# after 10 s itself), and a server started by spawn_server to stop coglet and itself
BACKEND_STOP_GRACE_S = 15.0
STOP_GRACE_S = BACKEND_STOP_GRACE_S + 5.0
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies
COG_YAML = PROJECT_ROOT / "cog.yaml"


def cog_yaml_concurrency(cog_yaml: Path = COG_YAML) -> int:
    """``concurrency.max`` of cog.yaml (1 without it): the predictions one worker runs at once.

    ``cog build`` turns it into ``COG_MAX_CONCURRENCY`` in the image; ``server_command`` does
    the same for the local server.
    """
    import yaml  # cog's own dependency; imported here, the only place that reads cog.yaml

    try:
        document = yaml.safe_load(cog_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{cog_yaml}: cannot read concurrency.max ({exc}); fix the file") from exc
    value = (document.get("concurrency") or {}).get("max", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{cog_yaml}: concurrency.max must be a whole number >= 1, got {value!r}")
    return value


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


def server_command(
    port: int,
    host: str = DEFAULT_HOST,
    predictor_ref: str = DEFAULT_PREDICTOR_REF,
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run coglet for ``predictor_ref`` (run it from the project root)."""
    env = dict(os.environ if base_env is None else base_env)
    env["COG_PREDICT_TYPE_STUB"] = predictor_ref
    env["PORT"] = str(port)
    env.setdefault("COG_MAX_CONCURRENCY", str(cog_yaml_concurrency()))
    # coglet starts its worker as plain `python` from PATH; put this interpreter's folder
    # first so the worker sees the same virtualenv (and finds coglet and torch)
    interpreter_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([interpreter_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    # predict.py imports the codeformer package from the project root
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "cog.server.http", "--host", host], env


def spawn_server(port: int, extra_env: Mapping[str, str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ``python -m codeformer.serve --port PORT`` in its own process group, output to ``log_file``.

    Benchmarks and tests run the server this way; ``stop_server`` ends it.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "codeformer.serve", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env={**os.environ, **extra_env},
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, apart from the test's or benchmark's
    )


def stop_server(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """End a server started by ``spawn_server``: SIGTERM (it stops coglet and the worker), then SIGKILL.

    coglet has a process group of its own and a parent-death signal: a front killed
    before it could stop coglet still ends it.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace_s)


def _end_with_parent() -> None:
    """In the coglet child before exec: SIGTERM when the front dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_backend(backend: subprocess.Popen[bytes], grace_s: float = BACKEND_STOP_GRACE_S) -> None:
    """SIGTERM to coglet alone (it stops its worker, whose exit handlers run), then SIGKILL the rest."""
    with contextlib.suppress(ProcessLookupError):
        backend.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        backend.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(backend.pid, signal.SIGKILL)
    backend.wait()


def run_front(front: Front, backend: subprocess.Popen[bytes]) -> int:
    """Serve until SIGTERM/SIGINT or until coglet exits; then stop coglet and clean up.

    Returns 0 after a requested stop, else coglet's exit code (1 if it was 0).
    """
    stopping = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stopping.set()
        threading.Thread(target=front.shutdown, daemon=True).start()

    def watch_backend() -> None:
        code = backend.wait()
        if not stopping.is_set():
            logger.error("the Cog server exited with code %s; stopping", code)
            front.shutdown()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    threading.Thread(target=watch_backend, name="backend-watch", daemon=True).start()
    try:
        front.serve_forever()
    finally:
        front.server_close()
        stop_backend(backend)
        removed = remove_orphaned_output_dirs()
        logger.info("stopped; removed %d output folder(s) the worker left", removed)
    return 0 if stopping.is_set() else (backend.returncode or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Cog prediction server for predict.py locally.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    parser.add_argument("--host", default=DEFAULT_HOST, help="default %(default)s (0.0.0.0 to listen on all)")
    parser.add_argument("--predictor", default=DEFAULT_PREDICTOR_REF, help="default %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_port_free(args.host, args.port)
        schema = json.loads(write_schema(args.predictor).read_text())
        front = Front((args.host, args.port), schema)
    except (ConfigError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    command, env = server_command(front.backend_port, BACKEND_HOST, args.predictor)
    logger.info("starting the Cog server for %s on http://%s:%d", args.predictor, args.host, args.port)
    sys.stdout.flush()
    sys.stderr.flush()
    # coglet reads .cog/openapi_schema.json and predict.py from its working folder; it gets a
    # process group of its own, so that our signals reach it only through stop_backend
    backend = subprocess.Popen(
        command, env=env, cwd=PROJECT_ROOT, start_new_session=True, preexec_fn=_end_with_parent
    )
    return run_front(front, backend)


if __name__ == "__main__":
    sys.exit(main())
