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
"""

from __future__ import annotations

import base64
import mimetypes
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from codeformer.errors import CodeFormerError

READY = "READY"
BUSY = "BUSY"  # setup done, a prediction is running
SETUP_FAILED = "SETUP_FAILED"
DEFUNCT = "DEFUNCT"
FATAL_HEALTH_STATES = frozenset({SETUP_FAILED, DEFUNCT})


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
        request's figures (``images``, ``admission_wait_ms``, ...; README, "Metrics"); {} when
        the answer has none (a 409 or 422)."""
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
