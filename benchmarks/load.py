"""Timed requests to a Cog server: one at a time (``Requester``, ``run_profile``,
``profile_report``) or K clients at once (``run_level``, ``sweep_levels``), and the photos
they carry (``discover_images``, ``batches``).

    requester = Requester(server.client, request_options("max_speed", "safe", "none", 0.5), server)
    samples, round_seconds = run_profile(requester, [[photo]], warmup=1, repeats=3, on_request=print)
    report = run_level(requester, [[photo]], clients=2, rule=StopRule(duration_s=30.0))

Faces and stage ms come from each prediction's ``metrics`` (``image_metrics``), never from
its log lines. ``benchmarks/run_bench.py``,
``bench_single_image.py``, ``soak.py`` and ``gpu_check.py --server`` measure with it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from benchmarks.summary import summarize, throughput
from codeformer.errors import ConfigError
from codeformer.serving.client import CogClient, PredictionResult, ServerError, data_uri
from codeformer.serving.records import SETUP_MARKER, read_records
from codeformer.tools.local_server import LocalServer


# -- a prediction's figures (its metrics: codeformer.serving.request.request_metrics) -------
def image_metrics(metrics: dict[str, Any], count: int) -> list[dict[str, Any] | None]:
    """Per image of a request (``count`` images), its figures from the prediction's metrics;
    None for each when there are none (a failed request records no figures)."""
    images = metrics.get("images") or []
    return [images[index] if index < len(images) else None for index in range(count)]


def faces_per_image(metrics: dict[str, Any], count: int) -> tuple[list[int | None], list[int | None]]:
    """Faces found and restored per image of a request; None where the server did not say."""
    images = image_metrics(metrics, count)
    return (
        [None if image is None else image["faces_found"] for image in images],
        [None if image is None else image["faces_restored"] for image in images],
    )


def stage_ms_per_image(metrics: dict[str, Any], count: int) -> list[dict[str, float]]:
    """Per image of a request, the server's stage -> ms; {} where it gave none."""
    return [{} if image is None else dict(image["stages_ms"]) for image in image_metrics(metrics, count)]


# -- the photos a run sends ----------------------------------------------------------------
def split_names(values: Sequence[str] | None, allowed: Sequence[str], flag: str) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``, each checked against ``allowed``, order kept."""
    names: list[str] = []
    for name in (name.strip() for value in values or [] for name in value.split(",")):
        if name and name not in allowed:
            raise ConfigError(f"{flag}: unknown {name!r}; choose from {', '.join(allowed)}")
        if name and name not in names:
            names.append(name)
    return names


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def discover_images(image_dir: Path, selection: Sequence[str] | None = None) -> list[Path]:
    """The photos to send: ``selection`` is None (all of ``image_dir``), one count N (the first N
    in numeric order), or file names/paths (as given, else inside ``image_dir``)."""
    if selection and not (len(selection) == 1 and selection[0].isdigit()):
        paths = [Path(item) if Path(item).is_file() else image_dir / item for item in selection]
        for item, path in zip(selection, paths, strict=True):
            if not path.is_file():
                raise ConfigError(f"--images: no such file {item} (nor {image_dir / item})")
        return paths
    if not image_dir.is_dir():
        raise ConfigError(f"--image-dir: {image_dir} is not a folder")
    found = sorted(
        (p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: (0, int(p.stem)) if p.stem.isdigit() else (1, p.name),  # 2.jpg before 10.jpg
    )
    if not found:
        raise ConfigError(
            f"--image-dir: no {'/'.join(IMAGE_SUFFIXES)} files in {image_dir}; "
            "build samples with python data/make_samples.py"
        )
    count = int(selection[0]) if selection else len(found)
    if count < 1:
        raise ConfigError("--images: the count must be at least 1")
    if count > len(found):
        raise ConfigError(f"--images {count}: {image_dir} has only {len(found)} images")
    return found[:count]


def batches(paths: Sequence[Path], batch_size: int) -> list[list[Path]]:
    return [list(paths[start : start + batch_size]) for start in range(0, len(paths), batch_size)]


# -- timed requests --------------------------------------------------------------------------
# One request is a RequestSample (client latency, 409 retries, the server's
# metrics.predict_time, faces found and restored per image from its metrics' images);
# run_profile sends the warm-up and timed rounds (benchmarks/harness.py's send_cold a fresh
# server's first request), profile_report sums them up. The concurrency levels (below) send
# the same requests from several threads.
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
    faces_restored: list[int | None] = field(default_factory=list)
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
    False returns it as the request's answer (run_level counts it as a rejection).
    """

    def __init__(
        self,
        client: CogClient,
        options: dict[str, Any],
        server: LocalServer | None = None,
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
        predict_time = result.metrics.get("predict_time")
        found, restored = faces_per_image(result.metrics, len(batch))
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
            faces_restored=restored,
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
        "round_totals": {**summarize(round_seconds), "values": list(round_seconds)},
        "per_request": summarize(s.latency_s for s in succeeded),
        "per_image": summarize(s.latency_s / len(s.images) for s in succeeded for _ in s.images),
        "predict_time": summarize(s.predict_time_s for s in with_server_time),
        # HTTP, JSON, base64 and coglet's queueing: what the client pays beyond the prediction
        "client_overhead": summarize(s.latency_s - (s.predict_time_s or 0.0) for s in with_server_time),
        "throughput_images_per_s": throughput(sum(len(s.images) for s in succeeded), sum(round_seconds)),
        "faces": {
            "found": _sum_or_none([f for s in first_round for f in s.faces_found]),
            "restored": _sum_or_none([r for s in first_round for r in s.faces_restored]),
            "per_image": {
                name: {"found": found, "restored": restored}
                for s in first_round
                for name, found, restored in zip(s.images, s.faces_found, s.faces_restored, strict=True)
            },
        },
        "errors": len(errors),
        "error_messages": list(dict.fromkeys(s.error for s in errors if s.error))[:MAX_ERROR_MESSAGES],
        "retries": sum(s.retries for s in samples),
        "samples": [asdict(s) for s in samples],
    }


# -- concurrency levels ----------------------------------------------------------------------
# K clients at once against a Cog server, each sending its next request as soon as one is answered.
#
#     # "N": the predictor's concurrency max
#     levels = parse_levels(["1", "2", "4", "N"], runner_concurrency())
#     report = run_level(requester, image_batches, clients=2, rule=StopRule(duration_s=30.0))
#
# `run_bench.py --concurrency` and `gpu_check.py --server --concurrency` measure with it.
# Each client is a thread with its own HTTP session, starting at its own photo (client i at
# batch i) and cycling through them. A level starts all its clients together and ends when the
# last answer arrives: a client sends no new request after `--duration-s`, or once the level
# has `--requests` answers other than 409 (the answers in flight still count).
#
# A `409 Conflict` ("at capacity") is not retried in place: it is one request of the level,
# counted in `rejected_409` and in no latency figure, and the client that got it pauses
# `BUSY_BACKOFF_S` before it sends its next request (back to back it would flood a busy
# server with requests that take a millisecond each). So `requests = succeeded + rejected_409
# + errors`, a server that takes more requests than it can serve at once shows up as 409s,
# and `throughput_images_per_s` = images of the succeeded requests / the level's wall time.
# A request that gets no answer at all (server gone) is an error and ends its client.
BUSY_BACKOFF_S = 0.1  # short next to any prediction, long next to the time a 409 takes to answer
MAX_CLIENTS = 64  # one thread each; far above any slot count this server declares
DEFAULT_DURATION_S = 30.0
OnRequest = Callable[[RequestSample], None]  # a progress callback; in a level, called from the client threads


@dataclass(frozen=True)
class StopRule:
    """When a level stops sending: after ``duration_s``, or after ``requests`` non-409 answers."""

    duration_s: float | None = None
    requests: int | None = None

    def as_report(self) -> dict[str, Any]:
        return asdict(self) | {"busy_backoff_s": BUSY_BACKOFF_S}


def parse_levels(values: Sequence[str], server_max: int) -> list[int]:
    """``["1", "2,4", "N"]`` -> ``[1, 2, 4, server_max]``, duplicates dropped, order kept."""
    levels: list[int] = []
    for item in (item.strip() for value in values for item in value.split(",")):
        level = server_max if item.upper() == "N" else int(item) if item.isdigit() else 0
        if not 1 <= level <= MAX_CLIENTS:
            raise ConfigError(
                f"--concurrency: {item!r} is not a client count; give whole numbers 1-{MAX_CLIENTS} "
                f"or N (the predictor's concurrency max, here {server_max}), e.g. --concurrency 1 2 4 N"
            )
        if level not in levels:
            levels.append(level)
    return levels


@dataclass(frozen=True)
class LoadPlan:
    """The levels to measure, in order, and when each stops."""

    levels: list[int]
    rule: StopRule
    server_max: int  # the predictor's concurrency max (of this checkout, also with --server-url)

    def as_report(self) -> dict[str, Any]:
        return {"levels": self.levels, "concurrency_max": self.server_max, "stop": self.rule.as_report()}


def sweep_levels(
    requester: Requester,
    image_batches: Sequence[Sequence[Path]],
    plan: LoadPlan,
    on_request: OnRequest | None = None,
    deadline: float | None = None,
) -> dict[str, dict[str, Any]]:
    """``run_level`` for each K in turn, keyed by K (as text, for JSON); none starts past ``deadline``."""
    results: dict[str, dict[str, Any]] = {}
    for clients in plan.levels:
        if deadline is not None and time.monotonic() >= deadline:
            break
        results[str(clients)] = run_level(requester, image_batches, clients, plan.rule, on_request, deadline)
    return results


class _Level:
    """One level's clients and what they share: the stop rule, the clock, the samples."""

    def __init__(self, rule: StopRule, deadline: float | None, twins: list[Requester]) -> None:
        self.rule, self.deadline, self.twins = rule, deadline, twins
        self.left = rule.requests  # answers other than 409 still wanted (count rule)
        self.samples: list[RequestSample] = []
        self.lock = threading.Lock()
        self.start_together = threading.Barrier(len(twins) + 1)
        self.started = self.ends_at = 0.0

    def open(self) -> None:
        """Start the clock and release the clients (they wait at the barrier until then)."""
        self.started = time.monotonic()
        ends = [t for t in (self.deadline, self.rule.duration_s and self.started + self.rule.duration_s) if t]
        self.ends_at = min(ends) if ends else float("inf")
        self.start_together.wait()

    def take(self) -> bool:
        """Whether a client may send another request (taking one of a count rule's answers)."""
        with self.lock:
            if time.monotonic() >= self.ends_at or (self.left is not None and self.left <= 0):
                return False
            if self.left is not None:
                self.left -= 1
            return True

    def record(self, sample: RequestSample) -> None:
        with self.lock:
            self.samples.append(sample)
            if sample.http_status == 409 and self.left is not None:
                self.left += 1  # a 409 used up no answer: the level still wants that many

    def client_loop(
        self,
        index: int,
        batches: Sequence[Sequence[Path]],
        on_request: OnRequest | None,
    ) -> None:
        self.start_together.wait()
        for sent in itertools.count(index):  # client i starts at batch i
            if not self.take():
                return
            sent_at = time.monotonic() - self.started
            try:
                sample = self.twins[index].send(batches[sent % len(batches)], "timed")
            except ServerError as exc:  # no answer: the server is gone, later requests fail the same way
                latency = time.monotonic() - self.started - sent_at
                sample = RequestSample("timed", None, [], latency, 0, None, 0, None, error=str(exc)[:500])
            sample.client, sample.sent_at_s = index, sent_at
            self.record(sample)
            if on_request is not None and sample.http_status != 409:  # a progress bar counts answers
                on_request(sample)
            if sample.http_status == 0:
                return
            if sample.http_status == 409:
                time.sleep(BUSY_BACKOFF_S)


def run_level(
    requester: Requester,
    image_batches: Sequence[Sequence[Path]],
    clients: int,
    rule: StopRule,
    on_request: OnRequest | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """``clients`` threads sending back to back until ``rule`` (or the monotonic ``deadline``) says stop."""
    requester.encode([path for batch in image_batches for path in batch])
    level = _Level(rule, deadline, [requester.clone(retry_busy=False) for _ in range(clients)])
    # daemon threads: an interrupted benchmark stops its server, which ends their requests
    threads = [
        threading.Thread(target=level.client_loop, args=(i, image_batches, on_request), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    level.open()
    try:
        for thread in threads:
            thread.join()
    finally:
        for twin in level.twins:
            twin.client.session.close()
    return level_report(clients, level.samples, time.monotonic() - level.started)


def level_report(clients: int, samples: Sequence[RequestSample], wall_s: float) -> dict[str, Any]:
    """The figures of one level (see the module docstring for what counts as what)."""
    succeeded = [s for s in samples if s.ok]
    rejected = [s for s in samples if s.http_status == 409]
    errors = [s for s in samples if not s.ok and s.http_status != 409]
    images = sum(len(s.images) for s in succeeded)
    return {
        "concurrency": clients,
        "requests": len(samples),
        "succeeded": len(succeeded),
        "rejected_409": len(rejected),
        "errors": len(errors),
        "error_messages": list(dict.fromkeys(s.error for s in errors if s.error))[:MAX_ERROR_MESSAGES],
        "images": images,
        "wall_s": wall_s,
        "throughput_images_per_s": throughput(images, wall_s),
        "per_request": summarize(s.latency_s for s in succeeded),
        "predict_time": summarize(s.predict_time_s for s in succeeded if s.predict_time_s is not None),
        "succeeded_per_client": [sum(1 for s in succeeded if s.client == i) for i in range(clients)],
        "samples": [asdict(s) for s in sorted(samples, key=lambda s: s.sent_at_s or 0.0)],
    }


def setup_info(server_log: str) -> dict[str, Any]:
    """Device and setup seconds from the predictor's ``setup_timings`` record, when present."""
    records = read_records(server_log, SETUP_MARKER)
    if not records:
        return {}
    return {
        "device": records[-1]["device"],
        "setup_load_s": records[-1]["load_ms"] / 1000.0,
        "setup_warmup_s": records[-1]["warmup_ms"] / 1000.0,
    }
