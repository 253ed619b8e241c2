"""K clients at once against a Cog server, each sending its next request as soon as one is answered.

    levels = parse_levels(["1", "2", "4", "N"], runner_concurrency())  # "N": the predictor's concurrency max
    report = run_level(requester, image_batches, clients=2, rule=StopRule(duration_s=30.0))

``run_bench.py --concurrency`` and ``gpu_check.py --server --concurrency`` measure with it.
Each client is a thread with its own HTTP session, starting at its own photo (client i at
batch i) and cycling through them. A level starts all its clients together and ends when the
last answer arrives: a client sends no new request after ``--duration-s``, or once the level
has ``--requests`` answers other than 409 (the answers in flight still count).

A ``409 Conflict`` ("at capacity") is not retried in place: it is one request of the level,
counted in ``rejected_409`` and in no latency figure, and the client that got it pauses
``BUSY_BACKOFF_S`` before it sends its next request (back to back it would flood a busy
server with requests that take a millisecond each). So ``requests = succeeded + rejected_409
+ errors``, a server that takes more requests than it can serve at once shows up as 409s,
and ``throughput_images_per_s`` = images of the succeeded requests / the level's wall time.
A request that gets no answer at all (server gone) is an error and ends its client.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
from harness import MAX_ERROR_MESSAGES, Requester, RequestSample

from codeformer.errors import ConfigError
from codeformer.serving.client import ServerError
from codeformer.serving.serve import runner_concurrency

BUSY_BACKOFF_S = 0.1  # short next to any prediction (>= 10 ms on a GPU), long next to a 409's ~1 ms
MAX_CLIENTS = 64  # one thread each; far above any slot count this server declares
DEFAULT_DURATION_S = 30.0
OnRequest = Callable[[RequestSample], None]  # called from the client threads


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--concurrency``, ``--duration-s``, ``--requests``: the same flags in every script."""
    parser.add_argument(
        "--concurrency",
        nargs="+",
        metavar="K",
        help="measure K clients sending back to back, for each K given (whole numbers or N = "
        "the predictor's concurrency max), e.g. 1 2 4 N; a 409 is counted, the client pauses "
        f"{BUSY_BACKOFF_S} s and sends its next request",
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--duration-s",
        type=float,
        help=f"with --concurrency: seconds each K sends new requests (default {DEFAULT_DURATION_S:g})",
    )
    stop.add_argument("--requests", type=int, help="with --concurrency: answers other than 409 per K")


@dataclass(frozen=True)
class LoadPlan:
    """The levels to measure, in order, and when each stops."""

    levels: list[int]
    rule: StopRule
    server_max: int  # the predictor's concurrency max (of this checkout, also with --server-url)

    def as_report(self) -> dict[str, Any]:
        return {"levels": self.levels, "concurrency_max": self.server_max, "stop": self.rule.as_report()}


def check_arguments(args: argparse.Namespace) -> LoadPlan | None:
    """What ``add_arguments``' flags ask for; None without ``--concurrency``. Raises ConfigError."""
    if args.concurrency is None:
        if args.duration_s is not None or args.requests is not None:
            raise ConfigError("--duration-s and --requests apply to --concurrency only: add --concurrency")
        return None
    if args.requests is not None and args.requests < 1:
        raise ConfigError(f"--requests must be at least 1, got {args.requests}")
    if args.duration_s is not None and not args.duration_s > 0:
        raise ConfigError(f"--duration-s must be more than 0, got {args.duration_s}")
    server_max = runner_concurrency()
    if args.requests is not None:
        rule = StopRule(requests=args.requests)
    else:
        rule = StopRule(duration_s=args.duration_s or DEFAULT_DURATION_S)
    return LoadPlan(parse_levels(args.concurrency, server_max), rule, server_max)


def sweep(
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
        "throughput_images_per_s": harness.throughput(images, wall_s),
        "per_request": harness.summarize(s.latency_s for s in succeeded),
        "predict_time": harness.summarize(
            s.predict_time_s for s in succeeded if s.predict_time_s is not None
        ),
        "succeeded_per_client": [sum(1 for s in succeeded if s.client == i) for i in range(clients)],
        "samples": [asdict(s) for s in sorted(samples, key=lambda s: s.sent_at_s or 0.0)],
    }


def render(levels: dict[str, dict[str, dict[str, Any]]], server_max: int) -> str:
    """A table: one row per (name, K), ``levels`` being name -> K -> ``level_report``."""
    headers = ["", "K", "req", "ok", "409", "errors", "img/s", "req p50", "req p95", "req p99", "wall"]
    rows = [
        [name, str(k), str(r["requests"]), str(r["succeeded"]), str(r["rejected_409"]), str(r["errors"])]
        + [harness.seconds(r["throughput_images_per_s"], 3)]
        + [harness.seconds(r["per_request"][key]) for key in ("p50", "p95", "p99")]
        + [harness.seconds(r["wall_s"], 1)]
        for name, by_level in levels.items()
        for k, r in by_level.items()
    ]
    legend = f"(K clients back to back; seconds; @cog.concurrent max N = {server_max})"
    return harness.format_table(headers, rows) + "\n" + legend


def latency_curves(levels: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[float]]:
    """Succeeded requests' latencies per (name, K), for ``harness.plot_cdf``."""
    return {
        f"{name} K={k}": [s["latency_s"] for s in r["samples"] if s["status"] == "succeeded"]
        for name, by_level in levels.items()
        for k, r in by_level.items()
    }


def swept_levels(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """profile -> K -> level report, from a run_bench report ({} without --concurrency)."""
    return {name: p["levels"] for name, p in report.get("concurrency", {}).get("profiles", {}).items()}
