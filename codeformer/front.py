"""The local server's front: one HTTP hop in front of coglet that adds what coglet cannot.

``python -m codeformer.serve`` runs coglet on a private loopback port and this front on the
public one. Every request goes through unchanged, except:
- an input key that the schema does not name (``codeformer_fidelty``) gets ``422`` naming it,
  in coglet's own validation-error shape; coglet drops such keys silently and runs with
  the defaults;
- a failed prediction's ``error`` loses the prefixes coglet adds to every exception
  (``Prediction failed: Prediction failed: InputError: ``), so that a client reads the
  predictor's one sentence (``images[1] (a.jpg): not a readable image ...``);
- while coglet is not listening yet, ``/health-check`` answers ``STARTING``.

The Cog image (``cog build``) runs coglet alone, without this front: there unknown keys are
dropped and errors keep coglet's prefixes (README, "Local server").
"""

from __future__ import annotations

import contextlib
import difflib
import http.client
import json
import logging
import re
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from codeformer.errors import CodeFormerError

logger = logging.getLogger(__name__)

BACKEND_HOST = "127.0.0.1"
# hop-by-hop headers (RFC 9110 section 7.6.1) are the front's own business on each side
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
)
# coglet's predictor wraps a predict() exception twice: "Prediction failed: Prediction failed: Class: text"
COGLET_ERROR_PREFIX = re.compile(r"^(?:(?:Async )?[Pp]rediction failed: )+")
EXCEPTION_CLASS_PREFIX = re.compile(r"^(?P<name>[A-Za-z_][\w.<>]*): ")


def _project_error_names() -> frozenset[str]:
    names = set()
    pending: list[type] = [CodeFormerError]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return frozenset(names)


def clean_error(text: str) -> str:
    """coglet's error text without its prefixes; the class name stays unless it is one of ours.

    An unexpected exception (``RuntimeError: CUDA out of memory``) keeps its class: it says
    what kind of failure it was. The project's own errors are sentences that name the input.
    """
    text = COGLET_ERROR_PREFIX.sub("", text, count=1)
    match = EXCEPTION_CLASS_PREFIX.match(text)
    if match and match.group("name").rsplit(".", 1)[-1] in _project_error_names():
        text = text[match.end() :]
    return text


def unknown_input_detail(body: bytes, input_names: tuple[str, ...]) -> dict[str, Any] | None:
    """A 422 body naming each ``input`` key the schema does not have, or None when all are known."""
    try:
        request = json.loads(body)
    except ValueError:
        return None  # coglet answers malformed JSON itself
    inputs = request.get("input") if isinstance(request, dict) else None
    if not isinstance(inputs, dict):
        return None
    details = []
    for key in inputs:
        if key in input_names:
            continue
        close = difflib.get_close_matches(str(key), input_names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        details.append(
            {
                "loc": ["body", "input", key],
                "msg": f"unknown input '{key}'; {hint}the inputs are {', '.join(input_names)}",
                "type": "value_error.unknown_input",
            }
        )
    return {"detail": details} if details else None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((BACKEND_HOST, 0))
        return probe.getsockname()[1]


class Front(ThreadingHTTPServer):
    """Listens on ``address``; forwards to coglet on ``backend_port`` (127.0.0.1)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], schema: dict[str, Any]) -> None:
        self.input_names = tuple(schema["components"]["schemas"]["Input"]["properties"])
        self.backend_port = free_loopback_port()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _FrontHandler)


class _FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Front

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_PUT(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        self._forward()

    def _reply(self, status: int, document: dict[str, Any]) -> None:
        self._send(status, [("Content-Type", "application/json")], json.dumps(document).encode())

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        route = self.path.split("?", 1)[0].rstrip("/")
        if (
            self.command in ("POST", "PUT")
            and route.startswith("/predictions")
            and not route.endswith("/cancel")
        ):
            refusal = unknown_input_detail(body, self.server.input_names)
            if refusal is not None:
                self._reply(422, refusal)
                return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        backend = http.client.HTTPConnection(BACKEND_HOST, self.server.backend_port, timeout=None)
        try:
            backend.request(self.command, self.path, body=body, headers=headers)
            response = backend.getresponse()
            payload = response.read()
        except ConnectionRefusedError:
            if route == "/health-check":
                self._reply(200, {"status": "STARTING"})
            else:
                self._reply(503, {"status": "failed", "error": "the model server is starting; retry shortly"})
            return
        finally:
            backend.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            payload = _clean_errors_in(payload)
        kept = [
            (name, value)
            for name, value in response.getheaders()
            # the front writes its own Content-Length, Date and Server
            if name.lower() not in HOP_BY_HOP | {"content-length", "date", "server"}
        ]
        self._send(response.status, kept, payload)


def _clean_errors_in(payload: bytes) -> bytes:
    with contextlib.suppress(ValueError):
        document = json.loads(payload)
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            document["error"] = clean_error(document["error"])
            return json.dumps(document).encode()
    return payload
