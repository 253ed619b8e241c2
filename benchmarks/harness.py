"""What the benchmark scripts and the tests share: ports, the local Cog server, weights,
reports, summary statistics, the server's timings records, the flags of the HTTP benchmarks,
their timed requests and the concurrency levels.

Every script runs by path, from any folder: ``python benchmarks/run_bench.py --help``. Python
then puts ``benchmarks/`` on ``sys.path`` (so ``import harness`` works) but not the project
root that holds ``codeformer/`` and ``predict.py``; importing this module adds the root, here
and nowhere else. A script therefore imports ``harness`` before any project module (isort
keeps it there: it sorts ``harness`` with the third-party imports, ahead of ``codeformer``).
pytest puts both folders on the path (``pythonpath`` in pyproject.toml), so the tests import
``harness`` and the scripts by the same names.

    with LocalServer({"CODEFORMER_WEIGHTS_DIR": str(weights)}) as server:
        result = server.client.predict({"images": [data_uri(photo)]})

Sections, in order: ports; the local server; weights; reports; statistics (``summarize``:
NumPy's linear percentiles); the server's records (``request_timings``/``setup_timings`` JSON
lines, never the prose lines); the flags ``run_bench.py`` and ``bench_single_image.py``
share; timed requests (``Requester``, ``run_profile``, ``profile_report``); concurrency
levels (``run_level``, ``sweep_levels``: K clients at once).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from codeformer.config import PROFILES  # noqa: E402
from codeformer.errors import ConfigError  # noqa: E402
from codeformer.serving.client import CogClient, PredictionResult, ServerError, data_uri  # noqa: E402
from codeformer.serving.records import image_records, setup_info  # noqa: E402
from codeformer.serving.serve import (  # noqa: E402
    DEFAULT_HOST,
    check_port_free,
    runner_concurrency,
)
from codeformer.tools.local_server import LocalServer  # noqa: E402

log = logging.getLogger("benchmarks")

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"  # git-ignored
RANDOM_WEIGHTS_FOLDER = "random-weights-seed0"
RANDOM_WEIGHTS_LABEL = "RANDOM weights (seed 0): timings are real, the restored faces are noise"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so that ``finally`` blocks stop the server.

    SIGINT too: a process started from a non-interactive shell's background job inherits
    SIGINT ignored, and Python then installs no handler for it, so ``kill -INT`` would be lost.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# -- weights ---------------------------------------------------------------------------------
@contextlib.contextmanager
def random_weights_folder() -> Iterator[Path]:
    """Seed-0 random weights in the official formats, in a temporary folder removed on exit."""
    from codeformer.tools import random_weights  # imports torch: only where weights are written

    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        folder = Path(scratch) / RANDOM_WEIGHTS_FOLDER
        random_weights.write(folder, seed=0)
        yield folder


@dataclass(frozen=True)
class WeightsChoice:
    """What the server loads, as environment variables and as a label for the report."""

    env: dict[str, str]
    label: str
    random: bool

    def as_report(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "random": self.random,
            "env": {
                key: portable_path(value) if key.endswith("_DIR") else value
                for key, value in self.env.items()
            },
        }


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights-dir", type=Path, help="CODEFORMER_WEIGHTS_DIR for the server")
    weights.add_argument(
        "--random-weights", action="store_true", help="seed-0 random weights in a temp folder"
    )
    parser.add_argument("--weights-url", help="CODEFORMER_WEIGHTS_URL for the server (a mirror of the files)")


def choose_weights(args: argparse.Namespace, stack: contextlib.ExitStack) -> WeightsChoice:
    """The weights the flags of ``add_weights_arguments`` ask for; random ones live until ``stack`` closes."""
    if args.random_weights:
        folder = stack.enter_context(random_weights_folder())
        return WeightsChoice({"CODEFORMER_WEIGHTS_DIR": str(folder)}, RANDOM_WEIGHTS_LABEL, True)
    env: dict[str, str] = {}
    parts = []
    if args.weights_dir:
        env["CODEFORMER_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
        parts.append(f"folder {portable_path(args.weights_dir)}")
    if args.weights_url:
        env["CODEFORMER_WEIGHTS_URL"] = args.weights_url
        parts.append(f"downloaded from {args.weights_url}")
    return WeightsChoice(env, "weights: " + (", ".join(parts) or "the server's defaults"), False)


# -- reports ---------------------------------------------------------------------------------
def portable_path(path: str | Path) -> str:
    """A path as a committed report may hold it: relative to the project, else with no machine part.

    ``<temp>/name`` for the temp folder's contents, ``.../name`` elsewhere.
    """
    resolved = Path(path).resolve()
    if resolved.is_relative_to(PROJECT_ROOT):
        return resolved.relative_to(PROJECT_ROOT).as_posix()
    if resolved.is_relative_to(Path(tempfile.gettempdir()).resolve()):
        return f"<temp>/{resolved.name}"
    return f".../{resolved.name}"


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """The script's name and arguments (``sys.argv`` by default), absolute paths made portable."""

    def portable(arg: str) -> str:
        flag, equals, value = arg.partition("=")  # --output=/abs/path
        if equals and value.startswith("/"):
            return f"{flag}={portable_path(value)}"
        return portable_path(arg) if arg.startswith("/") else arg

    argv = sys.argv if argv is None else argv
    return [Path(argv[0]).name, *(portable(arg) for arg in argv[1:])]


def environment_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` as JSON to ``path`` atomically: a reader (or a killed run) sees a whole file.

    Scripts that write after each step (gpu_check.py) leave a whole file behind whenever they stop.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


def seconds(value: float | None, digits: int = 2) -> str:
    """A table cell: ``-`` where nothing was measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    ]
    header = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    return "\n".join([header, "-" * len(header), *lines])


# -- statistics ------------------------------------------------------------------------------
# Percentiles are numpy.percentile's default "linear" method (Hyndman & Fan type 7: with the
# samples sorted as x[0] .. x[n-1], the q-th percentile sits at rank (n - 1) * q / 100,
# interpolated between its neighbours), the method every figure in the README was computed with.
SUMMARY_PERCENTILES = (50, 95, 99)
SUMMARY_KEYS = ("count", "avg", "min", "max", "p50", "p95", "p99")


def _checked(values: Iterable[float]) -> list[float]:
    samples = [float(value) for value in values]
    if any(math.isnan(sample) for sample in samples):
        raise ValueError("samples contain NaN; drop failed measurements before summarizing")
    return samples


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """``count``, ``avg``, ``min``, ``max``, ``p50``, ``p95``, ``p99`` of ``values``.

    No samples (every request failed) gives ``count`` 0 and None for the rest, so that a
    report can still be written and read. NaN raises ``ValueError``: a failed measurement
    must be dropped, not averaged.
    """
    samples = _checked(values)
    if not samples:
        return {"count": 0, **{key: None for key in SUMMARY_KEYS[1:]}}
    percentiles = np.percentile(samples, SUMMARY_PERCENTILES, method="linear")
    return {
        "count": len(samples),
        "avg": math.fsum(samples) / len(samples),
        "min": min(samples),
        "max": max(samples),
        **{f"p{q}": float(value) for q, value in zip(SUMMARY_PERCENTILES, percentiles, strict=True)},
    }


def throughput(items: int, seconds: float) -> float | None:
    """Items per second; None when nothing was"""
    if seconds <= 0.0:
        return None
    return items / seconds


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF as (sorted samples, fraction of samples <= each): for plotting."""
    ordered = sorted(_checked(values))
    count = len(ordered)
    return ordered, [(index + 1) / count for index in range(count)]


def plot_cdf(curves: dict[str, Sequence[float]], path: Path, xlabel: str, title: str) -> None:
    """One step curve per name: the fraction of samples at or below x, as a PNG."""
    import matplotlib  # only when a plot is asked for

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, values in curves.items():
        if values:
            xs, ys = cdf_points(values)
            # start each curve at 0 so that a single sample still draws a visible step
            axes.step([xs[0], *xs], [0.0, *ys], where="post", marker=".", label=f"{name} (n={len(xs)})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("fraction of samples")
    axes.set_xlim(left=0.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- the server's records (codeformer.serving.records) -------------------------------------
def parse_faces(logs: str, count: int) -> tuple[list[int | None], list[int | None]]:
    """Faces found and kept per image of a request; None where the server did not say."""
    images = image_records(logs, count)
    return (
        [None if image is None else image["faces_found"] for image in images],
        [None if image is None else image["faces_kept"] for image in images],
    )


def parse_stage_ms(logs: str, count: int) -> list[dict[str, float]]:
    """Per image of a request, the server's stage -> ms; {} where not logged."""
    return [{} if image is None else dict(image["stages_ms"]) for image in image_records(logs, count)]


# -- flags run_bench.py and bench_single_image.py share --------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Port, weights, server environment, fidelity, warm-up and repeats."""
    parser.add_argument(
        "--port", type=int, default=5000, help="port for the local server (default %(default)s)"
    )
    add_weights_arguments(parser)
    parser.add_argument(
        "--server-env",
        action="append",
        metavar="KEY=VALUE",
        help="extra environment for the server, e.g. CODEFORMER_MAX_FACES=1 (repeatable)",
    )
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for READY")
    parser.add_argument(
        "--fidelity", type=float, default=0.5, help="codeformer_fidelity (default %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests first (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (default %(default)s)")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, and logging set up for the progress lines on stderr."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args


def check_run_arguments(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """Refuse contradictory flags and a taken ``--port``; returns ``--server-env`` and ``--profiles``."""
    profiles = split_names(args.profiles, list(PROFILES), "--profiles")
    if not profiles:
        raise ConfigError("--profiles: name at least one profile")
    if getattr(args, "server_url", None) is None:
        # before anything slow: a taken port must never let another server answer for this run
        check_port_free(DEFAULT_HOST, args.port)
    if args.random_weights and args.weights_url:
        raise ConfigError("--random-weights and --weights-url exclude each other")
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    if not 0.0 <= args.fidelity <= 1.0:
        raise ConfigError(f"--fidelity must be between 0 and 1, got {args.fidelity}")
    env: dict[str, str] = {}
    for item in args.server_env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--server-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env, profiles


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
# metrics.predict_time, faces found and kept per image from its request_timings record);
# send_cold times a fresh server's first request, run_profile the warm-up and timed rounds,
# profile_report sums them up. The concurrency levels (below) send the same requests from
# several threads.
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
        "round_totals": {**summarize(round_seconds), "values": list(round_seconds)},
        "per_request": summarize(s.latency_s for s in succeeded),
        "per_image": summarize(s.latency_s / len(s.images) for s in succeeded for _ in s.images),
        "predict_time": summarize(s.predict_time_s for s in with_server_time),
        # HTTP, JSON, base64 and coglet's queueing: what the client pays beyond the prediction
        "client_overhead": summarize(s.latency_s - (s.predict_time_s or 0.0) for s in with_server_time),
        "throughput_images_per_s": throughput(sum(len(s.images) for s in succeeded), sum(round_seconds)),
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
    server: LocalServer | None,
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
) -> LocalServer:
    """A server on ``port`` that ``stack`` stops on exit, whatever happens next (Ctrl-C included)."""
    server = LocalServer(env, port=port, log_path=log_path, ready_timeout_s=ready_timeout_s)
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


def add_concurrency_arguments(parser: argparse.ArgumentParser) -> None:
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


def check_concurrency_arguments(args: argparse.Namespace) -> LoadPlan | None:
    """What ``add_concurrency_arguments``' flags ask for; None without ``--concurrency``.

    Raises ConfigError."""
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


def render_levels(levels: dict[str, dict[str, dict[str, Any]]], server_max: int) -> str:
    """A table: one row per (name, K), ``levels`` being name -> K -> ``level_report``."""
    headers = ["", "K", "req", "ok", "409", "errors", "img/s", "req p50", "req p95", "req p99", "wall"]
    rows = [
        [name, str(k), str(r["requests"]), str(r["succeeded"]), str(r["rejected_409"]), str(r["errors"])]
        + [seconds(r["throughput_images_per_s"], 3)]
        + [seconds(r["per_request"][key]) for key in ("p50", "p95", "p99")]
        + [seconds(r["wall_s"], 1)]
        for name, by_level in levels.items()
        for k, r in by_level.items()
    ]
    legend = f"(K clients back to back; seconds; @cog.concurrent max N = {server_max})"
    return format_table(headers, rows) + "\n" + legend


def latency_curves(levels: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[float]]:
    """Succeeded requests' latencies per (name, K), for ``plot_cdf``."""
    return {
        f"{name} K={k}": [s["latency_s"] for s in r["samples"] if s["status"] == "succeeded"]
        for name, by_level in levels.items()
        for k, r in by_level.items()
    }


def swept_levels(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """profile -> K -> level report, from a run_bench report ({} without --concurrency)."""
    return {name: p["levels"] for name, p in report.get("concurrency", {}).get("profiles", {}).items()}
