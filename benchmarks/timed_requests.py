"""Timed requests to a Cog server, as ``run_bench.py`` and ``bench_single_image.py`` send them.

One request is a ``RequestSample`` (client latency, 409 retries, the server's
``metrics.predict_time``, faces found and kept per image, read from the server's log by
``server_log``); ``send_cold`` times a fresh server's first request, ``run_profile`` the
warm-up and timed rounds, ``profile_report`` sums them up. ``concurrent_load`` sends the same
requests from several threads at once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
import requests
import stats
from server_log import parse_faces, setup_info
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from codeformer.serving.client import CogClient, PredictionResult, ServerError, data_uri

log = logging.getLogger("benchmarks")

EXIT_REQUEST_FAILED = 1
EXIT_BAD_SETTING = 2
EXIT_INTERRUPTED = 130
MAX_ERROR_MESSAGES = 5


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
    client: int | None = None  # which concurrent client sent it (run_level), None when sent alone
    sent_at_s: float | None = None  # seconds from the start of its concurrency level

    @property
    def ok(self) -> bool:
        return self.http_status == 200 and self.status == "succeeded"


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
    """Sends batches of photos with fixed options; data URIs are encoded once, before timing.

    ``retry_busy``: a 409 is retried after the client's pause (and counted in ``retries``);
    False returns it as the request's answer (concurrent_load counts it as a rejection).
    """

    def __init__(
        self,
        client: CogClient,
        options: dict[str, Any],
        server: harness.LocalServer | None = None,
        *,
        retry_busy: bool = True,
    ) -> None:
        self.client = client
        self.options = options
        self.server = server  # the server we started, if any: its log explains a dropped connection
        self.retry_busy = retry_busy
        self._uris: dict[Path, str] = {}

    def encode(self, paths: Sequence[Path]) -> None:
        """Encode ``paths`` now (before any clock starts; clones share the encoded photos)."""
        for path in paths:
            if path not in self._uris:
                self._uris[path] = data_uri(path)

    def clone(self, *, retry_busy: bool) -> Requester:
        """The same options and encoded photos on a client of its own: a session serves one thread."""
        client = CogClient(self.client.base_url, request_timeout_s=self.client.request_timeout_s)
        twin = Requester(client, self.options, self.server, retry_busy=retry_busy)
        twin._uris = self._uris
        return twin

    def send(self, batch: Sequence[Path], phase: str, round_index: int | None = None) -> RequestSample:
        return self.send_result(batch, phase, round_index)[0]

    def send_result(
        self, batch: Sequence[Path], phase: str, round_index: int | None = None
    ) -> tuple[RequestSample, PredictionResult]:
        """The sample and the server's whole answer (its output files: gpu_check compares them)."""
        self.encode(batch)
        try:
            result = self.client.predict(
                {"images": [self._uris[path] for path in batch], **self.options}, retry_busy=self.retry_busy
            )
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
        sample = RequestSample(
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
        return sample, result


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


def progress_bar(
    stack: contextlib.ExitStack, total: int | None
) -> tuple[tqdm, Callable[[RequestSample], None]]:
    """A progress bar on stderr (closed with ``stack``) and the callback that advances it.

    ``total`` None: a count only (a concurrency level runs for a time, not a number of requests).
    """
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
