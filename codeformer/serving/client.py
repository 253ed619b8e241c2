"""A small client for the Cog prediction server: health, predictions, data URIs.

    client = CogClient("http://127.0.0.1:5000")
    client.wait_until_ready(timeout=600)
    result = client.predict({"images": [data_uri(Path("data/1.jpg"))]})
    if result.status == "succeeded":
        jpgs = result.output_bytes()

The server runs as many predictions at once as it has slots (``@cog.concurrent`` on
``Predictor.run``) and answers ``409 Conflict`` ("At capacity - all prediction slots busy")
to a request that arrives while all are taken; ``predict`` waits a short pause and sends it
again, and reports how many times it had to (``retries``), so that load tests can tell
queueing from failure. A failed prediction's ``error`` is Cog's text: its prefix, then the
project's sentence naming the input.

A synchronous answer that is lost (a dropped connection, a timeout) cannot be fetched again:
coglet has no ``GET /predictions/{id}``, and the same ``PUT`` sent again while the first runs
answers ``202 processing`` without output. ``predict_async`` sends what can be retried: a
``PUT /predictions/{id}`` with ``Prefer: respond-async`` and a webhook, the same id again on
a lost answer or a 409, and reads the terminal state from the webhook:

    with WebhookReceiver() as webhooks:
        result = client.predict_async({"images": [...]}, webhooks)
"""

from __future__ import annotations

import base64
import http.server
import json
import mimetypes
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from codeformer.errors import CodeFormerError

READY = "READY"
BUSY = "BUSY"  # setup done, a prediction is running
SETUP_FAILED = "SETUP_FAILED"
DEFUNCT = "DEFUNCT"
UNHEALTHY = "UNHEALTHY"  # the worker is gone: the server will fail every prediction
FATAL_HEALTH_STATES = frozenset({SETUP_FAILED, DEFUNCT, UNHEALTHY})
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


class ServerError(CodeFormerError):
    """The server cannot serve: its setup failed, it exited, or it never became ready."""


def data_uri(source: bytes | str | Path, *, name: str | None = None, media_type: str | None = None) -> str:
    """A base64 data URI of a file (or of bytes), with the file name as a ``name=`` parameter.

    The parameter is legal RFC 2397 syntax that Cog ignores; the predictor reads it back
    so that its error messages can name the file (``images[1] (corrupt.jpg)``).
    """
    if isinstance(source, bytes):
        payload = source
    else:
        path = Path(source)
        payload = path.read_bytes()
        name = path.name if name is None else name
    if media_type is None:
        guessed = mimetypes.guess_type(name)[0] if name else None
        media_type = guessed or "application/octet-stream"
    name_parameter = f";name={urllib.parse.quote(name, safe='')}" if name else ""
    return f"data:{media_type}{name_parameter};base64,{base64.b64encode(payload).decode('ascii')}"


def decode_data_uri(uri: str) -> bytes:
    """The payload of a ``data:`` URI (base64 or percent-encoded)."""
    if not uri.startswith("data:") or "," not in uri:
        raise ValueError(f"not a data URI: {uri[:40]!r}")
    header, payload = uri.split(",", 1)
    if header.endswith(";base64"):
        return base64.b64decode(payload)
    return urllib.parse.unquote_to_bytes(payload)


@dataclass(frozen=True)
class PredictionResult:
    """One answer of ``POST /predictions``, after any 409 retries."""

    http_status: int
    body: dict[str, Any]
    retries: int  # 409 answers that were retried before this one
    elapsed_s: float  # wall time from the first attempt to this answer

    @property
    def status(self) -> str | None:
        """``succeeded``, ``failed``, ``canceled``; None for answers without one (422)."""
        return self.body.get("status")

    @property
    def error(self) -> str | None:
        return self.body.get("error")

    @property
    def output(self) -> list[Any]:
        return self.body.get("output") or []

    @property
    def logs(self) -> str:
        return self.body.get("logs") or ""

    @property
    def metrics(self) -> dict[str, Any]:
        """The prediction's ``metrics``: Cog's ``predict_time`` and, once it succeeded, the
        request's figures (``images``, ``admission_wait_ms``, ...; docs/serving.md, "Metrics"),
        or once it failed ``image_count`` and ``failed_at``, the step it reached; {} when the
        answer has none (a 409 or 422)."""
        return self.body.get("metrics") or {}

    def output_bytes(self, session: requests.Session | None = None) -> list[bytes]:
        """The output files' contents, in order (data URIs decoded, URLs fetched)."""
        files: list[bytes] = []
        for item in self.output:
            if item.startswith("data:"):
                files.append(decode_data_uri(item))
            else:
                response = (session or requests).get(item, timeout=60)
                response.raise_for_status()
                files.append(response.content)
        return files


class CogClient:
    """Talks to one Cog server; safe to share across threads only with one client per thread."""

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout_s: float = 900.0,
        busy_pause_s: float = 0.5,
        max_busy_wait_s: float = 900.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.busy_pause_s = busy_pause_s
        self.max_busy_wait_s = max_busy_wait_s
        self.session = requests.Session()

    def health(self, timeout_s: float = 10.0) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/health-check", timeout=timeout_s)
        response.raise_for_status()
        return response.json()

    def wait_until_ready(
        self,
        timeout_s: float = 600.0,
        poll_interval_s: float = 0.5,
        process: subprocess.Popen[Any] | None = None,
    ) -> dict[str, Any]:
        """Poll ``/health-check`` until the server reports READY; returns that health document.

        Raises ``ServerError`` when setup failed, when ``process`` (the server, if we started
        it) exits, or when ``timeout_s`` passes first.
        """
        deadline = time.monotonic() + timeout_s
        last_state = "no answer"
        while True:
            if process is not None and process.poll() is not None:
                raise ServerError(f"the server exited with code {process.returncode} before it was ready")
            try:
                health = self.health()
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet
            else:
                last_state = health.get("status", "no status")
                if last_state == READY:
                    return health
                if last_state in FATAL_HEALTH_STATES:
                    setup_logs = (health.get("setup") or {}).get("logs", "")
                    raise ServerError(f"server health is {last_state}; setup logs:\n{setup_logs[-4000:]}")
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"{self.base_url} was not ready within {timeout_s:.0f} s (last health: {last_state})"
                )
            time.sleep(poll_interval_s)

    def predict(self, inputs: dict[str, Any], *, retry_busy: bool = True) -> PredictionResult:
        """Run one prediction synchronously; on 409 wait ``busy_pause_s`` and retry (if asked).

        Returns the server's answer whatever its status (200 succeeded/failed, 422, or the
        last 409 when ``max_busy_wait_s`` ran out); connection errors propagate.
        """
        start = time.monotonic()
        retries = 0
        while True:
            response = self.session.post(
                f"{self.base_url}/predictions", json={"input": inputs}, timeout=self.request_timeout_s
            )
            busy = response.status_code == 409
            waited = time.monotonic() - start
            if not (busy and retry_busy and waited + self.busy_pause_s <= self.max_busy_wait_s):
                return PredictionResult(response.status_code, _json_body(response), retries, waited)
            retries += 1
            time.sleep(self.busy_pause_s)

    def predict_async(
        self,
        inputs: dict[str, Any],
        webhooks: WebhookReceiver,
        *,
        prediction_id: str | None = None,
        attempts: int = 3,
    ) -> PredictionResult:
        """Run one prediction as ``PUT /predictions/{id}`` (async, webhook); the terminal webhook's body.

        A lost answer (connection error, timeout) or a 409 sends the same ``PUT`` again (up to
        ``attempts`` times for lost answers; 409s for up to ``max_busy_wait_s``): the id is
        the same, so a prediction that did start runs once and its webhook brings the result.
        An answer other than 202 (422: invalid input) is returned as it is.
        """
        prediction_id = prediction_id or f"pred-{uuid.uuid4().hex}"
        body = {
            "input": inputs,
            "webhook": webhooks.url,
            "webhook_events_filter": ["completed"],
        }
        start = time.monotonic()
        retries = 0
        lost = 0
        while True:
            try:
                response = self.session.put(
                    f"{self.base_url}/predictions/{prediction_id}",
                    json=body,
                    headers={"Prefer": "respond-async"},
                    timeout=60,
                )
            except (requests.ConnectionError, requests.Timeout):
                lost += 1
                if lost >= attempts:
                    raise
                time.sleep(self.busy_pause_s)
                continue
            waited = time.monotonic() - start
            if response.status_code == 409 and waited + self.busy_pause_s <= self.max_busy_wait_s:
                retries += 1
                time.sleep(self.busy_pause_s)
                continue
            if response.status_code != 202:
                return PredictionResult(response.status_code, _json_body(response), retries, waited)
            final = webhooks.wait(prediction_id, self.request_timeout_s)
            return PredictionResult(200, final, retries, time.monotonic() - start)

    def cancel(self, prediction_id: str) -> int:
        """Ask the server to cancel a running prediction; returns the HTTP status."""
        response = self.session.post(f"{self.base_url}/predictions/{prediction_id}/cancel", timeout=30)
        return response.status_code


def _json_body(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"error": response.text}
    return body if isinstance(body, dict) else {"body": body}


class WebhookReceiver:
    """An HTTP server on ``host`` (127.0.0.1 by default) that keeps every webhook Cog sends it, by id.

    ``url`` is what goes into a prediction's ``webhook``; ``wait(id)`` returns the first
    terminal state (succeeded, failed, canceled) received for ``id``; ``received(id)`` all of
    them in order.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._bodies: dict[str, list[dict[str, Any]]] = {}
        self._arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self.send_response(400)
                else:
                    receiver._keep(body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per webhook on stderr would drown a test's output

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhooks", daemon=True)
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"http://{bound_host}:{bound_port}/webhook"

    def _keep(self, body: dict[str, Any]) -> None:
        with self._arrived:
            self._bodies.setdefault(str(body.get("id")), []).append(body)
            self._arrived.notify_all()

    def received(self, prediction_id: str) -> list[dict[str, Any]]:
        with self._arrived:
            return list(self._bodies.get(prediction_id, []))

    def wait(self, prediction_id: str, timeout_s: float) -> dict[str, Any]:
        """The first terminal webhook of ``prediction_id``; ``TimeoutError`` after ``timeout_s``."""

        def terminal() -> dict[str, Any] | None:
            bodies = self._bodies.get(prediction_id, [])
            return next((body for body in bodies if body.get("status") in TERMINAL_STATUSES), None)

        with self._arrived:
            if not self._arrived.wait_for(lambda: terminal() is not None, timeout_s):
                last = [body.get("status") for body in self._bodies.get(prediction_id, [])]
                raise TimeoutError(
                    f"prediction {prediction_id}: no terminal webhook within {timeout_s:.0f} s "
                    f"(received: {last or 'nothing'})"
                )
            found = terminal()
            assert found is not None
            return found

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
