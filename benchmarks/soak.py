"""Sustained load: N requests through the local Cog server, good and bad inputs mixed.

    python benchmarks/soak.py --random-weights [--requests 300] [--profile max_speed]
        [--max-faces 1] [--face-every 10] [--bad-every 4] [--output soak.json]
    python benchmarks/soak.py --weights-dir DIR ...          # weights already on disk
    python benchmarks/soak.py --url http://127.0.0.1:5000 [--server-pid PID]   # a running server

Starts ``python -m codeformer.serving.serve`` on a free 127.0.0.1 port (unless ``--url``), then
sends the requests one after the other, each a tiny generated image: a flat canvas (no
face: the detector is the only network that runs), every ``--face-every``-th a small
textured image on which the random detector finds faces, and every ``--bad-every``-th a
bad input drawn in turn from ``BAD_KINDS`` (each must fail with its own message, get
422 from the schema, or run with an unknown key dropped, as Cog does). Reported, as JSON
on stdout (and in ``--output``):

- outcomes: expected successes and failures per kind, and every unexpected answer (a good
  input that failed, a bad one that succeeded or failed with the wrong message, a
  connection error, a 5xx), with its message;
- latency of the flat-canvas requests (the same work every time) after the warm-up, p50 and
  p95 of the first and of the last 10 %, and their ratio;
- ``busy_retries_total``: 409 "at capacity" answers the client waited out (coglet frees
  its slot a moment after it answers, so a strictly sequential client sometimes meets one);
- the worker's resident memory (VmRSS of the coglet worker, a child of the server),
  its open file descriptors and the predictor's output folders left in the temp folder,
  at the start (after warm-up), the middle and the end, plus a sample every
  ``--sample-every`` requests.

The targets of the reliability issue: 0 unexpected failures, RSS growth under 100 MB after
warm-up, last-10 % latency within 10 % of the first 10 %. The script reports; it does not
judge, except that it exits 1 when any answer was unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
import requests

from benchmarks import reports, summary
from codeformer.serving.client import CogClient, data_uri
from codeformer.serving.outputs import OUTPUT_DIR_PREFIX
from codeformer.tools import local_server
from codeformer.tools.inputs import BAD_KINDS, flat_canvas_png, soak_plan, textured_png

log = logging.getLogger("benchmarks.soak")


# -- one request -----------------------------------------------------------------------------
@dataclass
class Outcome:
    index: int
    kind: str  # "flat", "faces" or a BadKind name
    expected: str  # "succeeded" or "failed"
    http_status: int | None
    status: str | None
    latency_s: float
    verdict: str  # "expected" or "unexpected"
    message: str  # the error, or why the answer was unexpected
    busy_retries: int = 0  # 409 "at capacity" answers the client waited out before this one


def run_one(client: CogClient, index: int, kind: str, profile: str) -> Outcome:
    bad = {bad_kind.name: bad_kind for bad_kind in BAD_KINDS}.get(kind)
    if bad is None:
        payload = flat_canvas_png() if kind == "flat" else textured_png(seed=index)
        inputs = {"images": [data_uri(payload, name=f"{kind}.png")], "runtime_profile": profile}
    else:
        inputs = bad.make_inputs(profile)
    expected = "succeeded" if bad is None or bad.dropped else "failed"
    start = time.perf_counter()
    try:
        result = client.predict(inputs)
    except requests.RequestException as exc:
        latency = time.perf_counter() - start
        return Outcome(
            index, kind, expected, None, None, latency, "unexpected", f"{type(exc).__name__}: {exc}"
        )
    latency = time.perf_counter() - start
    message = result.error or ""
    if bad is None or bad.dropped:
        ok = result.http_status == 200 and result.status == "succeeded" and len(result.output) == 1
        why = "" if ok else f"a good input got HTTP {result.http_status} {result.status}: {message}"
    elif bad.http_status == 422:
        ok = result.http_status == 422
        message = json.dumps(result.body.get("detail", result.body))[:300]
        why = "" if ok else f"expected 422, got HTTP {result.http_status} {result.status}"
    else:
        ok = (
            result.http_status == 200
            and result.status == "failed"
            and bad.error_contains in message
            and "images[0] (" in message
        )
        why = "" if ok else f"expected a failure naming images[0] with {bad.error_contains!r}"
    return Outcome(
        index,
        kind,
        expected,
        result.http_status,
        result.status,
        latency,
        "expected" if ok else "unexpected",
        message if ok else f"{why}; got: {message}",
        result.retries,
    )


# -- the run ---------------------------------------------------------------------------------
def output_dirs_in_temp() -> int:
    """The predictor's output folders in the temp folder (it keeps only the last request's)."""
    return sum(1 for _ in Path(tempfile.gettempdir()).glob(f"{OUTPUT_DIR_PREFIX}*"))


def resource_sample(index: int, worker_pid: int | None) -> dict[str, Any]:
    sample: dict[str, Any] = {"after_request": index, "worker_rss_mib": None, "worker_open_fds": None}
    if worker_pid is not None:
        with contextlib.suppress(OSError, KeyError):
            sample["worker_rss_mib"] = local_server.status_kib(worker_pid, "VmRSS") / 1024.0
        sample["worker_open_fds"] = local_server.open_fds(worker_pid)
    sample["output_dirs_in_temp"] = output_dirs_in_temp()
    return sample


def _window(samples: list[float], first: bool) -> list[float]:
    size = max(1, round(len(samples) * 0.1))
    return samples[:size] if first else samples[-size:]


def latency_report(outcomes: list[Outcome], warmup: int) -> dict[str, Any]:
    """p50/p95 of the first and last 10 % of the flat-canvas requests after the warm-up."""
    flat = [o.latency_s for o in outcomes[warmup:] if o.kind == "flat" and o.verdict == "expected"]
    report: dict[str, Any] = {
        "kind": "flat",
        "samples": len(flat),
        "all_after_warmup": summary.summarize(flat),
    }
    if not flat:
        return report
    first, last = summary.summarize(_window(flat, first=True)), summary.summarize(_window(flat, first=False))
    report["first_10pct"] = first
    report["last_10pct"] = last
    report["last_over_first_p50"] = last["p50"] / first["p50"] if first["p50"] else None
    report["last_over_first_p95"] = last["p95"] / first["p95"] if first["p95"] else None
    report["by_kind"] = {
        kind: summary.summarize([o.latency_s for o in outcomes[warmup:] if o.kind == kind])
        for kind in sorted({o.kind for o in outcomes[warmup:]})
    }
    return report


def soak(
    client: CogClient,
    server_pid: int | None,
    requests_total: int,
    profile: str,
    face_every: int,
    bad_every: int,
    warmup: int,
    sample_every: int,
) -> dict[str, Any]:
    """Send the planned requests; returns the report (see the module docstring)."""
    worker_pid = local_server.find_worker_pid(server_pid) if server_pid is not None else None
    kinds = soak_plan(requests_total, face_every, bad_every)
    warmup = min(warmup, max(0, requests_total - 1))
    middle = warmup + (requests_total - warmup) // 2
    outcomes: list[Outcome] = []
    samples: list[dict[str, Any]] = []
    marks: dict[str, dict[str, Any]] = {}
    if warmup == 0:
        marks["start"] = resource_sample(-1, worker_pid)
    wall_start = time.perf_counter()
    for index, kind in enumerate(kinds):
        outcome = run_one(client, index, kind, profile)
        outcomes.append(outcome)
        if outcome.verdict == "unexpected":
            log.warning("request %d (%s): unexpected: %s", index, kind, outcome.message)
        number = index + 1
        if number == warmup:
            marks["start"] = resource_sample(index, worker_pid)
        if number == middle:
            marks["middle"] = resource_sample(index, worker_pid)
        if sample_every and number % sample_every == 0:
            samples.append(resource_sample(index, worker_pid))
            log.info(
                "%d/%d requests, last %.2f s, %s", number, requests_total, outcome.latency_s, samples[-1]
            )
    marks["end"] = resource_sample(requests_total - 1, worker_pid)
    wall_s = time.perf_counter() - wall_start

    def counts(kinds: Iterable[str]) -> dict[str, int]:
        return dict(sorted(Counter(kinds).items()))

    expected = [o for o in outcomes if o.verdict == "expected"]
    unexpected = [asdict(o) for o in outcomes if o.verdict == "unexpected"]
    rss = {name: mark["worker_rss_mib"] for name, mark in marks.items()}
    growth = rss["end"] - rss["start"] if None not in (rss.get("start"), rss.get("end")) else None
    return {
        "config": {
            "requests": requests_total,
            "profile": profile,
            "face_every": face_every,
            "bad_every": bad_every,
            "warmup_requests": warmup,
            "worker_pid": worker_pid,
        },
        "wall_s": wall_s,
        "failures": {
            "expected_by_kind": counts(o.kind for o in expected if o.expected == "failed"),
            "unexpected_count": len(unexpected),
            "unexpected_by_kind": counts(o["kind"] for o in unexpected),
            "unexpected": unexpected,
        },
        "busy_retries_total": sum(o.busy_retries for o in outcomes),
        "successes_by_kind": counts(o.kind for o in expected if o.expected == "succeeded"),
        "latency_s": latency_report(outcomes, warmup),
        "resources": {**marks, "samples": samples},
        "worker_rss_growth_mib": growth,
        "requests_log": [asdict(o) for o in outcomes],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="default %(default)s")
    parser.add_argument("--profile", default="max_speed", help="runtime_profile of the good requests")
    parser.add_argument("--face-every", type=int, default=10, help="every k-th request has faces (0: never)")
    parser.add_argument("--bad-every", type=int, default=4, help="every k-th request is bad (0: never)")
    warmup_help = "requests left out of the figures (default: 5 %%, >= 3 face requests)"
    parser.add_argument("--warmup", type=int, default=None, help=warmup_help)
    parser.add_argument("--sample-every", type=int, default=10, help="resource sample period in requests")
    parser.add_argument("--max-faces", type=int, default=1, help="CODEFORMER_MAX_FACES of the server started")
    harness.add_weights_arguments(parser)
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None, help="with --url: its pid, for worker RSS")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--server-log", type=Path, default=None, help="server log (default: a temp file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    # the warm-up must include face requests: the first ones grow the worker's allocator pools
    warmup = args.warmup if args.warmup is not None else max(1, args.requests // 20, 3 * args.face_every)

    with contextlib.ExitStack() as stack:
        if args.url:
            client, server_pid = CogClient(args.url), args.server_pid
            client.wait_until_ready(args.ready_timeout)
        else:
            env = {"CODEFORMER_MAX_FACES": str(args.max_faces), **harness.choose_weights(args, stack).env}
            server = local_server.LocalServer(
                env, log_path=args.server_log, ready_timeout_s=args.ready_timeout
            )
            log.info("starting the server (log: %s)", server.log_path)
            client, server_pid = stack.enter_context(server).client, server.pid
        report = soak(
            client,
            server_pid,
            args.requests,
            args.profile,
            args.face_every,
            args.bad_every,
            warmup,
            args.sample_every,
        )
    if args.output is not None:
        reports.write_report(report, args.output)
    print(json.dumps(report, indent=2))
    return 1 if report["failures"]["unexpected_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
