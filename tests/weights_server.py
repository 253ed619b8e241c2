"""A small HTTP file server on 127.0.0.1 for tests: serves a folder, counts requests, fails on cue.

    with FileServer(folder) as server:
        server.fail("parsing_parsenet.pth", "cut", times=1)   # first request cut halfway
        os.environ["CODEFORMER_WEIGHTS_URL"] = server.url      # "http://127.0.0.1:PORT/"
        ...
        assert server.request_count("parsing_parsenet.pth") == 2
        assert server.completed_count("parsing_parsenet.pth") == 1

Paths are the request path without the leading "/" (a file ``folder/a/b.pth`` is served as
``a/b.pth``). Failure modes, set per path with ``fail(path, mode, times=N)`` (``times=None``:
every request until ``clear_failures()``):

- ``"not_found"``: 404 even when the file exists.
- ``"server_error"``: 500.
- ``"cut"``: headers with the full Content-Length, half the body, then a reset (RST).
- ``"truncated"``: headers with the full Content-Length, half the body, then a clean close.
- ``"slow"``: the whole body, but with ``delay`` seconds of silence before each chunk.
- ``"drip"``: the headers, then one byte of the body every ``delay`` seconds.
- ``"endless"``: no Content-Length, then zeros until the client hangs up.
- ``"huge_length"``: a Content-Length of 1 TB, then the file.

``redirect(path, location)`` answers ``302 Found`` with that Location (any scheme, relative
or absolute; two paths that redirect to each other make a loop), and ``content_type(path,
value)`` changes the Content-Type a file is served with (default application/octet-stream).

Every GET and HEAD is counted in ``request_count``; only bodies sent in full count in
``completed_count``. The server runs in a daemon thread and uses HTTP/1.0 (one request per
connection), so a cut connection cannot leak into a later request.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

FailureMode = Literal[
    "not_found", "server_error", "cut", "truncated", "slow", "drip", "endless", "huge_length"
]
FAILURE_MODES: tuple[str, ...] = (
    "not_found",
    "server_error",
    "cut",
    "truncated",
    "slow",
    "drip",
    "endless",
    "huge_length",
)
CHUNK_BYTES = 64 * 1024


@dataclass
class _Failure:
    mode: FailureMode
    remaining: int | None  # requests still to fail; None = all of them
    delay: float


class FileServer:
    """Serve the files of ``root`` on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, root: str | Path, port: int = 0) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._completed: Counter[str] = Counter()
        self._failures: dict[str, _Failure] = {}
        self._redirects: dict[str, str] = {}
        self._content_types: dict[str, str] = {}
        self._requested_port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FileServer:
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._requested_port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="FileServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FileServer is not running: call start() or use it as a context manager")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL with a trailing slash: ``url + "name.pth"`` fetches ``root/name.pth``."""
        return f"http://127.0.0.1:{self.port}/"

    def url_for(self, path: str) -> str:
        return self.url + path.lstrip("/")

    # -- failures --------------------------------------------------------------------------
    def fail(self, path: str, mode: FailureMode, *, times: int | None = None, delay: float = 0.5) -> None:
        """Make the next ``times`` requests for ``path`` fail in ``mode`` (all of them if None)."""
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; choose one of {FAILURE_MODES}")
        with self._lock:
            self._failures[path.lstrip("/")] = _Failure(mode, times, delay)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def clear_failure(self, path: str) -> None:
        with self._lock:
            self._failures.pop(path.lstrip("/"), None)

    def redirect(self, path: str, location: str) -> None:
        """Answer requests for ``path`` with ``302 Found`` to ``location``."""
        with self._lock:
            self._redirects[path.lstrip("/")] = location

    def content_type(self, path: str, value: str) -> None:
        with self._lock:
            self._content_types[path.lstrip("/")] = value

    # -- counters --------------------------------------------------------------------------
    def request_count(self, path: str) -> int:
        """GET/HEAD requests seen for ``path``, whatever their outcome."""
        with self._lock:
            return self._requests[path.lstrip("/")]

    def completed_count(self, path: str) -> int:
        """Responses whose full body was sent for ``path``."""
        with self._lock:
            return self._completed[path.lstrip("/")]

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()
            self._completed.clear()

    # -- used by the handler ---------------------------------------------------------------
    def _record_request(self, path: str) -> _Failure | None:
        """Count a request and return the failure to apply to it, if any."""
        with self._lock:
            self._requests[path] += 1
            failure = self._failures.get(path)
            if failure is None:
                return None
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    del self._failures[path]
            return failure

    def _record_completed(self, path: str) -> None:
        with self._lock:
            self._completed[path] += 1


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
            pass  # keep test output clean

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, send_body: bool) -> None:
            path = self.path.split("?", 1)[0].lstrip("/")
            failure = server._record_request(path)
            file = (server.root / path).resolve()
            location = server._redirects.get(path)
            if location is not None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if failure is not None and failure.mode == "not_found":
                self.send_error(404, "Not Found (injected)")
                return
            if failure is not None and failure.mode == "server_error":
                self.send_error(500, "Internal Server Error (injected)")
                return
            if not file.is_file() or not file.is_relative_to(server.root):
                self.send_error(404, "Not Found")
                return
            body = file.read_bytes()
            mode = failure.mode if failure is not None else None
            self.send_response(200)
            self.send_header("Content-Type", server._content_types.get(path, "application/octet-stream"))
            if mode == "huge_length":
                self.send_header("Content-Length", str(10**12))
            elif mode != "endless":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not send_body:
                return
            if failure is not None and failure.mode in ("drip", "endless"):
                self._trickle(body, failure)
                return
            if failure is not None and failure.mode in ("cut", "truncated"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if failure.mode == "cut":
                    # SO_LINGER with a zero timeout makes close() send RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                self.close_connection = True
                return
            delay = failure.delay if failure is not None and failure.mode == "slow" else 0.0
            try:
                for start in range(0, len(body), CHUNK_BYTES):
                    if delay:
                        time.sleep(delay)
                    self.wfile.write(body[start : start + CHUNK_BYTES])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up (e.g. its read timeout fired)
            server._record_completed(path)

        def _trickle(self, body: bytes, failure: _Failure) -> None:
            """``drip``: the body a byte at a time; ``endless``: zeros until the client hangs up."""
            zeros = bytes(CHUNK_BYTES)
            sent = 0
            try:
                while failure.mode == "endless" or sent < len(body):
                    if failure.mode == "drip":
                        time.sleep(failure.delay)
                        self.wfile.write(body[sent : sent + 1])
                        sent += 1
                    else:
                        self.wfile.write(zeros)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler
