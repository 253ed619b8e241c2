"""Run the real Cog prediction server locally, as ``cog serve`` would inside the image.

    python -m codeformer.serve --port 5000 [--host 127.0.0.1]

Writes ``.cog/openapi_schema.json`` (so that the server validates inputs), then replaces
this process with ``python -m cog.server.http`` (coglet) running ``predict.py:Predictor``
from the project root, in the foreground: Ctrl-C or SIGTERM stops it. Environment
variables (``CODEFORMER_WEIGHTS_DIR``, ``CODEFORMER_WEIGHTS_URL``, ``CODEFORMER_MAX_*``)
pass through to the predictor. The API is the one of ``cog serve``: ``GET /health-check``,
``POST /predictions``, ``POST /predictions/{id}/cancel``, ``GET /openapi.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from codeformer.errors import ConfigError
from codeformer.schema import DEFAULT_PREDICTOR_REF, PROJECT_ROOT, write_schema

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STOP_GRACE_S = 10.0  # seconds a stopping server gets after SIGTERM before SIGKILL


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
    # glibc gives each thread that contends for malloc an arena of its own: their freed
    # pages pile up (a 300-request soak grew the worker by 190 MB with the default, by 48 MB
    # with two arenas), and a thread's own arena maps every block over 64 MB afresh, so the
    # predictions, which run on coglet's threads, page-faulted their activations anew on
    # each forward. One arena serves them all from the main heap that
    # codeformer.runtime.retain_freed_memory keeps.
    env.setdefault("MALLOC_ARENA_MAX", "1")
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
        start_new_session=True,  # its own process group: stopping it also ends coglet's worker
    )


def stop_server(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """End a server started by ``spawn_server``, worker included: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    # coglet's worker may outlive its parent's SIGTERM; the group id is the server's pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Cog prediction server for predict.py locally.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    parser.add_argument("--host", default=DEFAULT_HOST, help="default %(default)s (0.0.0.0 to listen on all)")
    parser.add_argument("--predictor", default=DEFAULT_PREDICTOR_REF, help="default %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_port_free(args.host, args.port)
        write_schema(args.predictor)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    command, env = server_command(args.port, args.host, args.predictor)
    logger.info("starting the Cog server for %s on http://%s:%d", args.predictor, args.host, args.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(PROJECT_ROOT)  # coglet reads .cog/openapi_schema.json and predict.py from its working folder
    os.execve(command[0], command, env)
    return 0  # not reached: execve replaces this process


if __name__ == "__main__":
    sys.exit(main())
