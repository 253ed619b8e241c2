"""Sustained load: N requests through the local Cog server, good and bad inputs mixed.

    python -m benchmarks.soak --random-weights [--requests 300] [--profile max_speed]
        [--max-faces 1] [--face-every 10] [--bad-every 4] [--output soak.json]
    python -m benchmarks.soak --url http://127.0.0.1:5000 [--server-pid PID]   # a running server

Starts ``python -m codeformer.serve`` on a free 127.0.0.1 port (unless ``--url``), then
sends the requests one after the other, each a tiny generated image: a flat canvas (no
face: the detector is the only network that runs), every ``--face-every``-th a small
textured image on which the random detector finds faces, and every ``--bad-every``-th a
bad input drawn in turn from ``BAD_KINDS`` (each must fail with its own message, or get
422 from the schema). Reported, as JSON on stdout (and in ``--output``):

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
import io
import json
import logging
import os
import socket
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from benchmarks.stats import summarize
from codeformer.client import CogClient, data_uri
from codeformer.serve import spawn_server, stop_server

log = logging.getLogger("benchmarks.soak")

WORKER_MARKER = b"_run_worker"  # coglet starts its worker as `python -c "...coglet.server._run_worker()"`
OUTPUT_DIR_PREFIX = "codeformer-outputs-"  # predict.py's per-request output folders


# -- the server's worker process: pid, memory, descriptors ----------------------------------
def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


def find_worker_pid(server_pid: int) -> int | None:
    """The coglet worker (where predict() runs) among the server's descendants, if it is up."""
    pending = [server_pid]
    while pending:
        pid = pending.pop()
        for child in child_pids(pid):
            with contextlib.suppress(OSError):
                if WORKER_MARKER in Path(f"/proc/{child}/cmdline").read_bytes():
                    return child
            pending.append(child)
    return None


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def minor_faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (field 10 of /proc/<pid>/stat)."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(after_name[7])  # fields from the 3rd on: state, ppid, pgrp, session, tty, tpgid, flags, minflt


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def output_dirs_in_temp() -> int:
    """The predictor's output folders in the temp folder (it keeps only the last request's)."""
    return sum(1 for _ in Path(tempfile.gettempdir()).glob(f"{OUTPUT_DIR_PREFIX}*"))


# -- inputs ----------------------------------------------------------------------------------
def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def flat_canvas_png(width: int = 64, height: int = 64) -> bytes:
    """A flat grey canvas: the random detector finds no face on it."""
    return _encode(Image.fromarray(np.full((height, width, 3), 127, np.uint8)), "PNG")


def textured_png(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """Uniform noise: the random (seed-0) detector finds faces on it, so CodeFormer runs."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "PNG")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (wrong) IDAT: a pixel-bomb header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    whole = _encode(Image.fromarray(pixels), "JPEG", quality=90)
    return whole[: len(whole) // 2]


@dataclass(frozen=True)
class BadKind:
    """A bad request and how it must be answered: 422 from the schema, or a failed prediction."""

    name: str
    make_inputs: Callable[[str], dict[str, Any]]  # profile -> request inputs
    http_status: int  # 200 (a failed prediction) or 422 (refused by the schema)
    error_contains: str  # in the failed prediction's error (ignored for 422)


def _one_file(payload: bytes, file_name: str) -> Callable[[str], dict[str, Any]]:
    return lambda profile: {"images": [data_uri(payload, name=file_name)], "runtime_profile": profile}


BAD_KINDS: tuple[BadKind, ...] = (
    BadKind("zero_bytes", _one_file(b"", "empty.jpg"), 200, "the file is empty"),
    BadKind(
        "random_bytes",
        _one_file(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "noise.jpg"),
        200,
        "not a readable image",
    ),
    BadKind("truncated_jpeg", _one_file(truncated_jpeg(), "cut.jpg"), 200, "cannot decode"),
    BadKind("text", _one_file(b"just some text\n", "notes.txt"), 200, "not a readable image"),
    BadKind(
        "pixel_bomb", _one_file(png_header_claiming(100_000, 100_000), "bomb.png"), 200, "over the limit"
    ),
    BadKind(
        "fidelity_out_of_range",
        lambda profile: {
            "images": [data_uri(flat_canvas_png(), name="ok.png")],
            "runtime_profile": profile,
            "codeformer_fidelity": 1.1,
        },
        422,
        "",
    ),
    BadKind(
        "unknown_profile",
        lambda profile: {"images": [data_uri(flat_canvas_png(), name="ok.png")], "runtime_profile": "turbo"},
        422,
        "",
    ),
    # extreme sizes: refused from the header, before any of the pipeline's copies exists
    BadKind("strip_30000x1", _one_file(png_header_claiming(30_000, 1), "strip.png"), 200, "too elongated"),
    BadKind("column_1x30000", _one_file(png_header_claiming(1, 30_000), "column.png"), 200, "too elongated"),
    BadKind(
        "misspelled_key",
        lambda profile: {
            "images": [data_uri(flat_canvas_png(), name="ok.png")],
            "runtime_profile": profile,
            "codeformer_fidelty": 0.9,
        },
        422,
        "",
    ),
    BadKind(
        "bad_base64",
        lambda profile: {"images": ["data:image/png;name=pad.png;base64,AAA"], "runtime_profile": profile},
        200,
        "base64 payload is invalid",
    ),
)


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


def plan(requests_total: int, face_every: int, bad_every: int) -> list[str]:
    """The kind of every request, in order; bad kinds rotate through BAD_KINDS."""
    kinds: list[str] = []
    bad_turn = 0
    for index in range(requests_total):
        number = index + 1
        if bad_every and number % bad_every == 0:
            kinds.append(BAD_KINDS[bad_turn % len(BAD_KINDS)].name)
            bad_turn += 1
        elif face_every and number % face_every == 0:
            kinds.append("faces")
        else:
            kinds.append("flat")
    return kinds


def run_one(client: CogClient, index: int, kind: str, profile: str) -> Outcome:
    bad = {bad_kind.name: bad_kind for bad_kind in BAD_KINDS}.get(kind)
    if bad is None:
        payload = flat_canvas_png() if kind == "flat" else textured_png(seed=index)
        inputs = {"images": [data_uri(payload, name=f"{kind}.png")], "runtime_profile": profile}
    else:
        inputs = bad.make_inputs(profile)
    expected = "succeeded" if bad is None else "failed"
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
    if bad is None:
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


# -- the server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_server(env: dict[str, str], log_path: Path, ready_timeout_s: float) -> Iterator[tuple[str, int]]:
    """``python -m codeformer.serve`` in its own process group; yields (url, server pid)."""
    port = free_port()
    with log_path.open("ab") as log_file:  # the child keeps its own handle
        process = spawn_server(port, env, log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        CogClient(url).wait_until_ready(ready_timeout_s, process=process)
        yield url, process.pid
    finally:
        stop_server(process)


# -- the run ---------------------------------------------------------------------------------
def resource_sample(index: int, worker_pid: int | None) -> dict[str, Any]:
    sample: dict[str, Any] = {"after_request": index, "worker_rss_mib": None, "worker_open_fds": None}
    if worker_pid is not None:
        with contextlib.suppress(OSError, KeyError):
            sample["worker_rss_mib"] = status_kib(worker_pid, "VmRSS") / 1024.0
        sample["worker_open_fds"] = open_fds(worker_pid)
    sample["output_dirs_in_temp"] = output_dirs_in_temp()
    return sample


def _window(samples: list[float], first: bool) -> list[float]:
    size = max(1, round(len(samples) * 0.1))
    return samples[:size] if first else samples[-size:]


def latency_report(outcomes: list[Outcome], warmup: int) -> dict[str, Any]:
    """p50/p95 of the first and last 10 % of the flat-canvas requests after the warm-up."""
    flat = [o.latency_s for o in outcomes[warmup:] if o.kind == "flat" and o.verdict == "expected"]
    report: dict[str, Any] = {"kind": "flat", "samples": len(flat), "all_after_warmup": summarize(flat)}
    if not flat:
        return report
    first, last = summarize(_window(flat, first=True)), summarize(_window(flat, first=False))
    report["first_10pct"] = first
    report["last_10pct"] = last
    report["last_over_first_p50"] = last["p50"] / first["p50"] if first["p50"] else None
    report["last_over_first_p95"] = last["p95"] / first["p95"] if first["p95"] else None
    report["by_kind"] = {
        kind: summarize([o.latency_s for o in outcomes[warmup:] if o.kind == kind])
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
    worker_pid = find_worker_pid(server_pid) if server_pid is not None else None
    kinds = plan(requests_total, face_every, bad_every)
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

    expected_by_kind = Counter(o.kind for o in outcomes if o.verdict == "expected")
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
            "expected_by_kind": dict(
                sorted(
                    Counter(
                        o.kind for o in outcomes if o.verdict == "expected" and o.expected == "failed"
                    ).items()
                )
            ),
            "unexpected_count": len(unexpected),
            "unexpected_by_kind": dict(sorted(Counter(o["kind"] for o in unexpected).items())),
            "unexpected": unexpected,
        },
        "busy_retries_total": sum(o.busy_retries for o in outcomes),
        "successes_by_kind": {
            kind: count for kind, count in sorted(expected_by_kind.items()) if kind in ("flat", "faces")
        },
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
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests left out of the figures (default: 5 %%, >= 3 face requests)",
    )
    parser.add_argument("--sample-every", type=int, default=10, help="resource sample period in requests")
    parser.add_argument("--max-faces", type=int, default=1, help="CODEFORMER_MAX_FACES of the server started")
    parser.add_argument(
        "--random-weights", action="store_true", help="seed-0 random weights in a temp folder"
    )
    parser.add_argument("--weights-dir", type=Path, default=None, help="CODEFORMER_WEIGHTS_DIR of the server")
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

    def run(url: str, server_pid: int | None) -> dict[str, Any]:
        client = CogClient(url)
        client.wait_until_ready(args.ready_timeout)
        return soak(
            client,
            server_pid,
            args.requests,
            args.profile,
            args.face_every,
            args.bad_every,
            warmup,
            args.sample_every,
        )

    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        if args.url:
            report = run(args.url, args.server_pid)
        else:
            env = {"CODEFORMER_MAX_FACES": str(args.max_faces)}
            if args.random_weights:
                from codeformer import random_weights

                random_weights.write(Path(scratch) / "weights", seed=0)
                env["CODEFORMER_WEIGHTS_DIR"] = str(Path(scratch) / "weights")
            elif args.weights_dir is not None:
                env["CODEFORMER_WEIGHTS_DIR"] = str(args.weights_dir)
            log_path = args.server_log or Path(scratch) / "server.log"
            log.info("starting the server (log: %s)", log_path)
            with local_server(env, log_path, args.ready_timeout) as (url, server_pid):
                report = run(url, server_pid)
    text = json.dumps(report, indent=2)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 1 if report["failures"]["unexpected_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
