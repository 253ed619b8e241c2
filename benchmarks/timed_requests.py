"""Timed requests to a Cog server, as ``run_bench.py`` and ``bench_single_image.py`` send them.

One request is a ``RequestSample`` (client latency, 409 retries, the server's
``metrics.predict_time``, faces found and kept per image); ``send_cold`` times a fresh
server's first request, ``run_profile`` the warm-up and timed rounds, ``profile_report``
sums them up. Also the flags the two scripts share and their checks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
import requests
import stats
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from codeformer.client import CogClient, ServerError, data_uri

log = logging.getLogger("benchmarks")

EXIT_REQUEST_FAILED = 1
EXIT_BAD_SETTING = 2
EXIT_INTERRUPTED = 130
MAX_ERROR_MESSAGES = 5
# The client reads two of predict.py's log lines (the only place these figures are reported):
# one per image: "images[0] (file.jpg): 470x192, faces found=3 kept=1, ..."
FACES_LINE = re.compile(
    r"images\[(?P<index>\d+)\] \(.*?\): \d+x\d+, faces found=(?P<found>\d+) kept=(?P<kept>\d+)"
)
# and one at the end of setup: "setup: device=cpu dtype=float32 (...) load=2792ms warmup=45546ms ..."
SETUP_LINE = re.compile(
    r"setup: device=(?P<device>\S+) .*?load=(?P<load_ms>\d+)ms warmup=(?P<warmup_ms>\d+)ms"
)


@dataclass
class RequestSample:
    """One request as the client saw it."""

    phase: str  # "cold", "warmup" or "timed"
    round: int | None  # timed round number (0-based), None for untimed requests
    images: list[str]
    latency_s: float  # client wall time, 409 retries included
    http_status: int
    status: str | None
    retries: int
    predict_time_s: float | None  # the server's metrics.predict_time
    faces_found: list[int | None] = field(default_factory=list)
    faces_kept: list[int | None] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.http_status == 200 and self.status == "succeeded"


def parse_faces(logs: str, count: int) -> tuple[list[int | None], list[int | None]]:
    """Faces found and kept per image of a request, from predict.py's per-image log lines."""
    found: list[int | None] = [None] * count
    kept: list[int | None] = [None] * count
    for match in FACES_LINE.finditer(logs):
        index = int(match["index"])
        if index < count:
            found[index], kept[index] = int(match["found"]), int(match["kept"])
    return found, kept


def setup_info(server_log: str) -> dict[str, Any]:
    """Device and setup seconds from the predictor's setup log line, when present."""
    match = SETUP_LINE.search(server_log)
    if match is None:
        return {}
    return {
        "device": match["device"],
        "setup_load_s": int(match["load_ms"]) / 1000.0,
        "setup_warmup_s": int(match["warmup_ms"]) / 1000.0,
    }


def request_options(
    profile: str, stability_mode: str, compile_backend: str, fidelity: float
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "codeformer_fidelity": fidelity,
        "runtime_profile": profile,
        "stability_mode": stability_mode,
    }
    if stability_mode != "safe":  # ignored by the server in safe mode; leave it out of the request
        options["compile_backend"] = compile_backend
    return options


class Requester:
    """Sends batches of photos with fixed options; data URIs are encoded once, before timing."""

    def __init__(
        self, client: CogClient, options: dict[str, Any], server: harness.LocalServer | None = None
    ) -> None:
        self.client = client
        self.options = options
        self.server = server  # the server we started, if any: its log explains a dropped connection
        self._uris: dict[Path, str] = {}

    def send(self, batch: Sequence[Path], phase: str, round_index: int | None = None) -> RequestSample:
        for path in batch:
            if path not in self._uris:
                self._uris[path] = data_uri(path)
        try:
            result = self.client.predict({"images": [self._uris[path] for path in batch], **self.options})
        except requests.RequestException as exc:
            # no answer at all: the server is gone or hung; later requests would only fail the same way
            log_tail = f"\n--- server log, last lines ---\n{self.server.log_tail()}" if self.server else ""
            raise ServerError(f"{self.client.base_url} did not answer: {exc}{log_tail}") from exc
        predict_time = (result.body.get("metrics") or {}).get("predict_time")
        found, kept = parse_faces(result.logs, len(batch))
        error = None
        if not (result.http_status == 200 and result.status == "succeeded"):
            detail = result.error or result.body.get("detail") or result.body
            error = f"HTTP {result.http_status} {result.status or ''}: {str(detail)[:500]}".strip()
        return RequestSample(
            phase=phase,
            round=round_index,
            images=[path.name for path in batch],
            latency_s=result.elapsed_s,
            http_status=result.http_status,
            status=result.status,
            retries=result.retries,
            predict_time_s=float(predict_time) if predict_time is not None else None,
            faces_found=found,
            faces_kept=kept,
            error=error,
        )


def run_profile(
    requester: Requester,
    image_batches: Sequence[Sequence[Path]],
    warmup: int,
    repeats: int,
    on_request: Callable[[RequestSample], None],
    first: RequestSample | None = None,
) -> tuple[list[RequestSample], list[float]]:
    """``warmup`` untimed requests (``first``, if given, counts as one), then ``repeats`` rounds."""
    samples: list[RequestSample] = [first] if first is not None else []
    for index in range(len(samples), warmup):
        samples.append(requester.send(image_batches[index % len(image_batches)], "warmup"))
        on_request(samples[-1])
    round_seconds: list[float] = []
    for round_index in range(repeats):
        start = time.monotonic()
        for batch in image_batches:
            samples.append(requester.send(batch, "timed", round_index))
            on_request(samples[-1])
        round_seconds.append(time.monotonic() - start)
    return samples, round_seconds


def _sum_or_none(values: Sequence[int | None]) -> int | None:
    return None if None in values else sum(v for v in values if v is not None)


def profile_report(
    samples: Sequence[RequestSample], round_seconds: Sequence[float], options: dict[str, Any]
) -> dict[str, Any]:
    """The figures of one profile from its requests (warm-up ones count only for errors/retries)."""
    timed = [s for s in samples if s.phase == "timed"]
    succeeded = [s for s in timed if s.ok]
    with_server_time = [s for s in succeeded if s.predict_time_s is not None]
    first_round = [s for s in succeeded if s.round == 0]  # faces: the images of one clean round
    errors = [s for s in samples if not s.ok]
    return {
        "options": options,
        "requests": len(timed),
        "images": sum(len(s.images) for s in timed),
        "warmup_requests": sum(1 for s in samples if s.phase != "timed"),
        "round_totals": {**stats.summarize(round_seconds), "values": list(round_seconds)},
        "per_request": stats.summarize(s.latency_s for s in succeeded),
        "per_image": stats.summarize(s.latency_s / len(s.images) for s in succeeded for _ in s.images),
        "predict_time": stats.summarize(s.predict_time_s for s in with_server_time),
        # HTTP, JSON, base64 and coglet's queueing: what the client pays beyond the prediction
        "client_overhead": stats.summarize(s.latency_s - (s.predict_time_s or 0.0) for s in with_server_time),
        "throughput_images_per_s": stats.throughput(
            sum(len(s.images) for s in succeeded), sum(round_seconds)
        ),
        "faces": {
            "found": _sum_or_none([f for s in first_round for f in s.faces_found]),
            "kept": _sum_or_none([k for s in first_round for k in s.faces_kept]),
            "per_image": {
                name: {"found": found, "kept": kept}
                for s in first_round
                for name, found, kept in zip(s.images, s.faces_found, s.faces_kept, strict=True)
            },
        },
        "errors": len(errors),
        "error_messages": list(dict.fromkeys(s.error for s in errors if s.error))[:MAX_ERROR_MESSAGES],
        "retries": sum(s.retries for s in samples),
        "samples": [asdict(s) for s in samples],
    }


def send_cold(
    requester: Requester,
    batch: Sequence[Path],
    server: harness.LocalServer | None,
    profile: str,
    on_request: Callable[[RequestSample], None],
) -> tuple[RequestSample, dict[str, Any]]:
    """The first request to a fresh ``server`` and its cold-start figures (None where not measured).

    It also counts as the first warm-up request: pass it to ``run_profile`` as ``first``.
    """
    first = requester.send(batch, "cold")
    answered_at = time.monotonic()
    on_request(first)
    started_at = server.started_at if server is not None else None
    return first, {
        "profile": profile,
        "images": len(first.images),
        "start_to_ready_s": server.start_to_ready_s if server is not None else None,
        "first_request_s": first.latency_s,
        "first_request_ok": first.ok,
        "first_request_error": first.error,
        "start_to_first_response_s": None if started_at is None else answered_at - started_at,
        **(setup_info(server.log_text()) if server is not None else {}),
    }


def start_server(
    port: int, env: dict[str, str], log_path: Path, ready_timeout_s: float, stack: contextlib.ExitStack
) -> harness.LocalServer:
    """A server on ``port`` that ``stack`` stops on exit, whatever happens next (Ctrl-C included)."""
    server = harness.LocalServer(env, port=port, log_path=log_path, ready_timeout_s=ready_timeout_s)
    stack.callback(server.stop)
    log.info("starting the server on port %d (log: %s); waiting for READY", port, log_path)
    server.start()
    log.info("READY after %.1f s", server.start_to_ready_s)
    return server


def progress_bar(stack: contextlib.ExitStack, total: int) -> tuple[tqdm, Callable[[RequestSample], None]]:
    """A progress bar on stderr (closed with ``stack``) and the callback that advances it."""
    progress = stack.enter_context(tqdm(total=total, unit="req", file=sys.stderr))
    stack.enter_context(logging_redirect_tqdm())

    def on_request(sample: RequestSample) -> None:
        progress.update(1)
        progress.set_postfix_str(f"last {sample.latency_s:.1f}s{'' if sample.ok else ' FAILED'}")

    return progress, on_request


def faces_cell(faces: dict[str, Any]) -> str:
    """``kept/found`` for a table, ``-`` where the log did not say."""
    return "-" if faces["kept"] is None else f"{faces['kept']}/{faces['found']}"


def server_env_lines(server_env: dict[str, str]) -> list[str]:
    if not server_env:
        return []
    return ["server environment: " + " ".join(f"{key}={value}" for key, value in server_env.items())]
