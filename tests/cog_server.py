"""Start and stop the real Cog server (``python -m codeformer.serve``) for a test.

    with CogServer(env={"CODEFORMER_WEIGHTS_DIR": str(weights)}) as server:
        result = server.client.predict({"images": [data_uri(photo)]})

The server runs in its own session (process group) on a free 127.0.0.1 port, with the
given variables added to this process's environment; ``start`` returns once
``/health-check`` says READY, and ``stop`` (always run by the context manager) ends the
whole group: coglet starts a worker process of its own, which must not outlive the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from codeformer.client import CogClient, ServerError
from codeformer.serve import spawn_server, stop_server

PORT_ATTEMPTS = 3  # a free port can be taken between picking it and the server binding it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CogServer:
    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 600.0,
        log_path: Path | None = None,
    ) -> None:
        self.extra_env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.client: CogClient | None = None
        self.health: dict | None = None
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="cog-server-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the server and its worker wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> CogServer:
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            with self.log_path.open("ab") as log_file:  # the child keeps its own handle
                self.process = spawn_server(self.port, self.extra_env, log_file)
            self.client = CogClient(self.url)
            try:
                self.health = self.client.wait_until_ready(self.ready_timeout_s, process=self.process)
                return self
            except ServerError as exc:
                port_taken = self.process.poll() is not None and "already in use" in self.log_text()
                self.stop()
                if port_taken and attempt + 1 < PORT_ATTEMPTS:
                    continue
                log_tail = self.log_text()[-6000:]
                raise ServerError(f"{exc}\n--- server log ({self.log_path}) ---\n{log_tail}") from exc
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """End the server's process group (SIGTERM, then SIGKILL after a grace period)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if self.client is not None:
            self.client.session.close()
        stop_server(process)

    def __enter__(self) -> CogServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
