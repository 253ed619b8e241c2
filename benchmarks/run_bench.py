"""Latency and throughput of the Cog HTTP server, measured from a client, per runtime profile.

    python benchmarks/run_bench.py [--image-dir data] [--images 4 | --images a.jpg b.jpg]
        [--batch-size 1] [--profiles baseline fast max_speed] [--stability-mode safe]
        [--compile-backend none] [--fidelity 0.5] [--warmup 1] [--repeats 3]
        [--port 5000 | --server-url http://host:port]
        [--weights-dir DIR | --weights-url URL | --random-weights] [--server-env KEY=VALUE ...]
        [--output benchmarks/results/run_bench_<time>.json] [--plot cdf.png]

Starts ``python -m codeformer.serve`` on ``--port`` in its own process group (refusing a
port that is already taken, so that a stale server can never answer for this run), waits
for READY, then per profile sends ``--warmup`` untimed requests followed by ``--repeats``
timed rounds over all images, ``--batch-size`` images per request, one request at a time.
A ``409 Conflict`` (server busy) is retried after a short pause and counted. The server is
stopped at the end whatever happens (also on Ctrl-C or SIGTERM).

Cold start: the first request to the fresh server is timed on its own (``cold``) with the
time from starting the server process to READY and to that first response; it counts as
the first warm-up request of the first profile (and is sent even with ``--warmup 0``).

Reported per profile: ``round_totals`` (one sample per repeat: the wall time of a round),
``per_request`` and ``per_image`` latency (a request's latency divided by its number of
images, one sample per image), each as avg/min/max/p50/p95/p99; images/s; the faces found
and kept (from the server's per-image log lines); errors and 409 retries; the server's own
``metrics.predict_time`` next to the client latency. A table goes to stdout, progress to
stderr, everything to ``--output`` as JSON; ``--plot`` draws the per-request latency CDF of
each profile. Exit code: 0, 1 when a request failed, 2 for a bad setting (taken port), 130
when interrupted.

``--random-weights`` writes seed-0 random weights in the official formats to a temporary
folder for the server: the timings are real, the restored faces are noise; the JSON and the
table say so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # run as a file (python benchmarks/run_bench.py): make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from benchmarks import stats  # noqa: E402
from codeformer.client import CogClient, ServerError, data_uri  # noqa: E402
from codeformer.config import COMPILE_BACKENDS, PROFILES, STABILITY_MODES  # noqa: E402
from codeformer.errors import ConfigError  # noqa: E402
from codeformer.schema import MAX_IMAGES, MIN_IMAGES  # noqa: E402
from codeformer.serve import DEFAULT_HOST, check_port_free, spawn_server, stop_server  # noqa: E402

log = logging.getLogger("benchmarks.run_bench")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RANDOM_WEIGHTS_LABEL = "RANDOM weights (seed 0): timings are real, the restored faces are noise"
READY_POLL_S = 0.1  # start-to-READY is read at this resolution
MAX_ERROR_MESSAGES = 5
EXIT_REQUEST_FAILED = 1
EXIT_BAD_SETTING = 2
EXIT_INTERRUPTED = 130
# predict.py logs one line per image: "images[0] (file.jpg): 470x192, faces found=3 kept=1, ..."
FACES_LINE = re.compile(
    r"images\[(?P<index>\d+)\] \(.*?\): \d+x\d+, faces found=(?P<found>\d+) kept=(?P<kept>\d+)"
)
# and one at the end of setup: "setup: device=cpu dtype=float32 (...) load=2792ms warmup=45546ms ..."
SETUP_LINE = re.compile(
    r"setup: device=(?P<device>\S+) .*?load=(?P<load_ms>\d+)ms warmup=(?P<warmup_ms>\d+)ms"
)


# -- inputs ----------------------------------------------------------------------------------
def _natural_key(path: Path) -> tuple[int, int | str]:
    # 2.jpg before 10.jpg, as data/make_samples.py numbers them
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.name)


def discover_images(image_dir: Path, selection: Sequence[str] | None = None) -> list[Path]:
    """The photos to send: ``selection`` is None (all of ``image_dir``), one count N (the first N
    in numeric order), or file names/paths (as given, else inside ``image_dir``)."""
    if selection and not (len(selection) == 1 and selection[0].isdigit()):
        paths = []
        for item in selection:
            path = Path(item)
            if not path.is_file() and (image_dir / item).is_file():
                path = image_dir / item
            if not path.is_file():
                raise ConfigError(f"--images: no such file {item} (nor {image_dir / item})")
            paths.append(path)
        return paths
    if not image_dir.is_dir():
        raise ConfigError(f"--image-dir: {image_dir} is not a folder")
    found = sorted(
        (p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=_natural_key,
    )
    if not found:
        raise ConfigError(
            f"--image-dir: no {'/'.join(IMAGE_SUFFIXES)} files in {image_dir}; "
            "build samples with python data/make_samples.py"
        )
    if selection:
        count = int(selection[0])
        if count < 1:
            raise ConfigError("--images: the count must be at least 1")
        if count > len(found):
            raise ConfigError(f"--images {count}: {image_dir} has only {len(found)} images")
        found = found[:count]
    return found


def split_names(values: Sequence[str] | None, allowed: Sequence[str], flag: str) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``, each checked against ``allowed``, order kept."""
    names: list[str] = []
    for value in values or []:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in allowed:
                raise ConfigError(f"{flag}: unknown {name!r}; choose from {', '.join(allowed)}")
            if name not in names:
                names.append(name)
    return names


def batches(paths: Sequence[Path], batch_size: int) -> list[list[Path]]:
    return [list(paths[start : start + batch_size]) for start in range(0, len(paths), batch_size)]


def parse_server_env(items: Sequence[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--server-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


# -- weights ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsChoice:
    """What the server loads, as environment variables and as a label for the report."""

    env: dict[str, str]
    label: str
    random: bool


def choose_weights(args: argparse.Namespace, stack: contextlib.ExitStack) -> WeightsChoice:
    """Write random weights into a temporary folder (removed by ``stack``) when asked."""
    if args.random_weights:
        from codeformer import random_weights  # imports torch: only when needed

        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-random-weights-")))
        log.info("writing seed-0 random weights to %s", folder)
        random_weights.write(folder, seed=0)
        return WeightsChoice({"CODEFORMER_WEIGHTS_DIR": str(folder)}, RANDOM_WEIGHTS_LABEL, True)
    env: dict[str, str] = {}
    parts = []
    if args.weights_dir:
        env["CODEFORMER_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
        parts.append(f"folder {env['CODEFORMER_WEIGHTS_DIR']}")
    if args.weights_url:
        env["CODEFORMER_WEIGHTS_URL"] = args.weights_url
        parts.append(f"downloaded from {args.weights_url}")
    return WeightsChoice(env, "weights: " + (", ".join(parts) or "the server's defaults"), False)


# -- the server ------------------------------------------------------------------------------
class LocalServer:
    """``python -m codeformer.serve`` on a fixed port, in its own process group.

    Unlike the tests' helper (which picks a free port), a benchmark must use the port it was
    given and must fail when it is taken; it also records when the process was started.
    """

    def __init__(self, port: int, env: dict[str, str], log_path: Path, ready_timeout_s: float) -> None:
        self.port = port
        self.extra_env = env
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # time.monotonic() just before the process started
        self.client = CogClient(self.url)

    @property
    def url(self) -> str:
        return f"http://{DEFAULT_HOST}:{self.port}"

    def start(self) -> float:
        """Start the server and wait for READY; returns the seconds from process start to READY."""
        check_port_free(DEFAULT_HOST, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log_file:  # the child keeps its own handle
            self.started_at = time.monotonic()
            self.process = spawn_server(self.port, self.extra_env, log_file)
        try:
            self.client.wait_until_ready(self.ready_timeout_s, READY_POLL_S, process=self.process)
        except ServerError as exc:
            raise ServerError(
                f"{exc}\n--- server log ({self.log_path}), last lines ---\n{self.log_tail()}"
            ) from exc
        return time.monotonic() - self.started_at

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """End the whole process group: SIGTERM, then SIGKILL after a grace period."""
        if self.process is None:
            return
        process, self.process = self.process, None
        self.client.session.close()
        stop_server(process)

    def log_tail(self, characters: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-characters:]

    def setup_info(self) -> dict[str, Any]:
        """Device and setup milliseconds from the predictor's setup log line, when present."""
        if not self.log_path.exists():
            return {}
        match = SETUP_LINE.search(self.log_path.read_text(errors="replace"))
        if match is None:
            return {}
        return {
            "device": match["device"],
            "setup_load_s": int(match["load_ms"]) / 1000.0,
            "setup_warmup_s": int(match["warmup_ms"]) / 1000.0,
        }


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


# -- requests --------------------------------------------------------------------------------
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


class Requester:
    """Sends batches of photos with fixed options; data URIs are encoded once, before timing."""

    def __init__(self, client: CogClient, options: dict[str, Any], server: LocalServer | None = None) -> None:
        self.client = client
        self.options = options
        self.server = server  # the server we started, if any: its log explains a dropped connection
        self._uris: dict[Path, str] = {}

    def send(self, batch: Sequence[Path], phase: str, round_index: int | None = None) -> RequestSample:
        uris = [self._uri(path) for path in batch]
        try:
            result = self.client.predict({"images": uris, **self.options})
        except requests.RequestException as exc:
            # no answer at all: the server is gone or hung; later requests would only fail the same way
            log_tail = f"\n--- server log, last lines ---\n{self.server.log_tail()}" if self.server else ""
            raise ServerError(f"{self.client.base_url} did not answer: {exc}{log_tail}") from exc
        metrics = result.body.get("metrics") or {}
        predict_time = metrics.get("predict_time")
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

    def _uri(self, path: Path) -> str:
        if path not in self._uris:
            self._uris[path] = data_uri(path)
        return self._uris[path]


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


def _sum_or_none(values: Sequence[int | None]) -> int | None:
    return None if any(value is None for value in values) else sum(v for v in values if v is not None)


def profile_report(
    samples: Sequence[RequestSample], round_seconds: Sequence[float], options: dict[str, Any]
) -> dict[str, Any]:
    """The figures of one profile from its requests (warm-up ones count only for errors/retries)."""
    timed = [s for s in samples if s.phase == "timed"]
    succeeded = [s for s in timed if s.ok]
    per_image = [s.latency_s / len(s.images) for s in succeeded for _ in s.images]
    with_server_time = [s for s in succeeded if s.predict_time_s is not None]
    first_round = [s for s in succeeded if s.round == 0]  # faces: the images of one clean round
    images_done = sum(len(s.images) for s in succeeded)
    faces_per_image: dict[str, dict[str, int | None]] = {}
    for sample in first_round:
        for name, found, kept in zip(sample.images, sample.faces_found, sample.faces_kept, strict=True):
            faces_per_image[name] = {"found": found, "kept": kept}
    errors = [s for s in samples if not s.ok]
    error_messages: list[str] = []
    for sample in errors:
        if sample.error and sample.error not in error_messages and len(error_messages) < MAX_ERROR_MESSAGES:
            error_messages.append(sample.error)
    return {
        "options": options,
        "requests": len(timed),
        "images": sum(len(s.images) for s in timed),
        "warmup_requests": sum(1 for s in samples if s.phase != "timed"),
        "round_totals": {**stats.summarize(round_seconds), "values": list(round_seconds)},
        "per_request": stats.summarize(s.latency_s for s in succeeded),
        "per_image": stats.summarize(per_image),
        "predict_time": stats.summarize(s.predict_time_s for s in with_server_time),
        # HTTP, JSON, base64 and coglet's queueing: what the client pays beyond the prediction
        "client_overhead": stats.summarize(
            s.latency_s - s.predict_time_s for s in with_server_time if s.predict_time_s is not None
        ),
        "throughput_images_per_s": stats.throughput(images_done, sum(round_seconds)),
        "faces": {
            "found": _sum_or_none([f for s in first_round for f in s.faces_found]),
            "kept": _sum_or_none([k for s in first_round for k in s.faces_kept]),
            "per_image": faces_per_image,
        },
        "errors": len(errors),
        "error_messages": error_messages,
        "retries": sum(s.retries for s in samples),
        "samples": [asdict(s) for s in samples],
    }


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
        sample = requester.send(image_batches[index % len(image_batches)], "warmup")
        samples.append(sample)
        on_request(sample)
    round_seconds: list[float] = []
    for round_index in range(repeats):
        start = time.monotonic()
        for batch in image_batches:
            sample = requester.send(batch, "timed", round_index)
            samples.append(sample)
            on_request(sample)
        round_seconds.append(time.monotonic() - start)
    return samples, round_seconds


# -- output ----------------------------------------------------------------------------------
def _seconds(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    ]
    header = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    return "\n".join([header, "-" * len(header), *lines])


def profiles_table(profiles: dict[str, dict[str, Any]]) -> str:
    headers = [
        "profile", "req", "img", "faces", "req avg", "req p50", "req p95", "req p99",
        "img p50", "round avg", "img/s", "server p50", "errors", "retries",
    ]  # fmt: skip
    rows = []
    for name, report in profiles.items():
        per_request, per_image = report["per_request"], report["per_image"]
        kept, found = report["faces"]["kept"], report["faces"]["found"]
        rows.append(
            [
                name,
                str(report["requests"]),
                str(report["images"]),
                "-" if kept is None else f"{kept}/{found}",
                _seconds(per_request["avg"]),
                _seconds(per_request["p50"]),
                _seconds(per_request["p95"]),
                _seconds(per_request["p99"]),
                _seconds(per_image["p50"]),
                _seconds(report["round_totals"]["avg"]),
                _seconds(report["throughput_images_per_s"], 3),
                _seconds(report["predict_time"]["p50"]),
                str(report["errors"]),
                str(report["retries"]),
            ]
        )
    return format_table(headers, rows)


def server_env_lines(server_env: dict[str, str]) -> list[str]:
    if not server_env:
        return []
    return ["server environment: " + " ".join(f"{key}={value}" for key, value in server_env.items())]


def cold_lines(cold: dict[str, Any]) -> list[str]:
    if cold.get("start_to_ready_s") is None:
        first = _seconds(cold.get("first_request_s"))
        return [f"server: already running; first request {first} s (not a cold figure)"]
    setup = ""
    if cold.get("setup_load_s") is not None:
        setup = f" (setup: load {cold['setup_load_s']:.1f} s, warm-up {cold['setup_warmup_s']:.1f} s)"
    return [
        f"cold start on {cold.get('device') or 'unknown device'}: process start -> READY "
        f"{cold['start_to_ready_s']:.1f} s{setup}",
        f"first request ({cold['profile']}, {cold['images']} image(s)) "
        f"{_seconds(cold['first_request_s'])} s{'' if cold['first_request_ok'] else ' (FAILED)'}; "
        f"process start -> first response {_seconds(cold['start_to_first_response_s'], 1)} s",
    ]


def plot_cdf(profiles: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """One step curve per profile: fraction of timed requests answered within x seconds."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, report in profiles.items():
        latencies = [
            s["latency_s"] for s in report["samples"] if s["phase"] == "timed" and s["error"] is None
        ]
        if latencies:
            xs, ys = stats.cdf_points(latencies)
            # start each curve at 0 so that a single sample still draws a visible step
            axes.step([xs[0], *xs], [0.0, *ys], where="post", marker=".", label=f"{name} (n={len(xs)})")
    axes.set_xlabel("request latency (s)")
    axes.set_ylabel("fraction of requests")
    axes.set_xlim(left=0.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def environment_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# -- command line ----------------------------------------------------------------------------
def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the server's port, weights and environment (shared with bench_single_image)."""
    parser.add_argument(
        "--port", type=int, default=5000, help="port for the local server (default %(default)s)"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights-dir", help="CODEFORMER_WEIGHTS_DIR for the server")
    weights.add_argument(
        "--random-weights", action="store_true", help="seed-0 random weights in a temp folder"
    )
    parser.add_argument("--weights-url", help="CODEFORMER_WEIGHTS_URL for the server (a mirror of the files)")
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


def check_common_arguments(args: argparse.Namespace) -> None:
    if args.random_weights and args.weights_url:
        raise ConfigError("--random-weights and --weights-url exclude each other")
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    if not 0.0 <= args.fidelity <= 1.0:
        raise ConfigError(f"--fidelity must be between 0 and 1, got {args.fidelity}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-dir", type=Path, default=PROJECT_ROOT / "data", help="default: data/")
    parser.add_argument("--images", nargs="+", help="a count N (the first N photos) or file names/paths")
    parser.add_argument(
        "--batch-size", type=int, default=1, help=f"images per request, {MIN_IMAGES}-{MAX_IMAGES}"
    )
    parser.add_argument(
        "--profiles", nargs="+", default=list(PROFILES), help="runtime profiles (default: all)"
    )
    parser.add_argument("--stability-mode", default="safe", choices=list(STABILITY_MODES))
    parser.add_argument("--compile-backend", default="none", choices=list(COMPILE_BACKENDS))
    add_server_arguments(parser)
    parser.add_argument(
        "--server-url", help="use this running server instead of starting one (no cold start)"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON report (default benchmarks/results/run_bench_<time>.json)"
    )
    parser.add_argument("--plot", type=Path, metavar="PNG", help="latency CDF per profile")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        check_common_arguments(args)
        profiles = split_names(args.profiles, list(PROFILES), "--profiles")
        if not profiles:
            raise ConfigError("--profiles: name at least one profile")
        if not MIN_IMAGES <= args.batch_size <= MAX_IMAGES:
            raise ConfigError(
                f"--batch-size must be between {MIN_IMAGES} and {MAX_IMAGES}, got {args.batch_size}"
            )
        server_env = parse_server_env(args.server_env)
        if args.server_url is None:
            # before anything slow: a taken port must never let another server answer for this run
            check_port_free(DEFAULT_HOST, args.port)
        images = discover_images(args.image_dir, args.images)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTING
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or RESULTS_DIR / f"run_bench_{stamp}.json"
    try:
        with sigterm_as_interrupt():
            report = run(args, profiles, images, server_env, output)
    except KeyboardInterrupt:
        log.error("interrupted; the server was stopped")
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTING
    except ServerError as exc:
        log.error("%s", exc)
        return EXIT_REQUEST_FAILED
    print(render(report))
    print(f"\nJSON: {output}" + (f"\nplot: {args.plot}" if args.plot else ""))
    failed = sum(p["errors"] for p in report["profiles"].values())
    return EXIT_REQUEST_FAILED if failed else 0


def render(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"run_bench: {len(config['images'])} image(s) from {config['image_dir']}, "
        f"batch {config['batch_size']}, "
        f"warm-up {config['warmup']}, repeats {config['repeats']}; stability_mode={config['stability_mode']} "
        f"compile_backend={config['compile_backend']} fidelity={config['fidelity']}",
        report["weights"]["label"],
        *server_env_lines(config["server_env"]),
        *cold_lines(report["cold"]),
        "",
        profiles_table(report["profiles"]),
        "(seconds; req = per request, img = per image, server = metrics.predict_time; "
        "faces = kept/found over one round)",
    ]
    return "\n".join(lines)


def cold_figures(
    first: RequestSample,
    first_response_at: float,
    server: LocalServer | None,
    start_to_ready_s: float | None,
    profile: str,
) -> dict[str, Any]:
    """The cold-start figures of a fresh server from its first request (None where not measured)."""
    started_at = server.started_at if server is not None else None
    return {
        "profile": profile,
        "images": len(first.images),
        "start_to_ready_s": start_to_ready_s,
        "first_request_s": first.latency_s,
        "first_request_ok": first.ok,
        "first_request_error": first.error,
        "start_to_first_response_s": None if started_at is None else first_response_at - started_at,
        **(server.setup_info() if server is not None else {}),
    }


def start_local_server(
    port: int, env: dict[str, str], log_path: Path, ready_timeout_s: float, stack: contextlib.ExitStack
) -> tuple[LocalServer, float]:
    """Start a server that ``stack`` stops on exit; returns it and its process-start-to-READY seconds."""
    server = LocalServer(port, env, log_path, ready_timeout_s)
    stack.callback(server.stop)  # whatever happens next, including Ctrl-C
    log.info("starting the server on port %d (log: %s); waiting for READY", port, log_path)
    start_to_ready = server.start()
    log.info("READY after %.1f s", start_to_ready)
    return server, start_to_ready


def run(
    args: argparse.Namespace,
    profiles: list[str],
    images: list[Path],
    server_env: dict[str, str],
    output: Path,
) -> dict[str, Any]:
    """Measure every profile; writes the JSON report (also a partial one when the run aborts)."""
    image_batches = batches(images, args.batch_size)
    report: dict[str, Any] = {
        "tool": "run_bench",
        "started_at": now_iso(),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:])],
        "config": {
            "image_dir": str(args.image_dir),
            "images": [str(p) for p in images],
            "batch_size": args.batch_size,
            "profiles": profiles,
            "stability_mode": args.stability_mode,
            "compile_backend": args.compile_backend,
            "fidelity": args.fidelity,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "port": None if args.server_url else args.port,
            "server_url": args.server_url,
            "server_env": server_env,
        },
        "environment": environment_info(),
        "weights": None,
        "cold": None,
        "profiles": {},
    }
    profile_reports: dict[str, dict[str, Any]] = report["profiles"]
    try:
        with contextlib.ExitStack() as stack:
            server: LocalServer | None = None
            start_to_ready: float | None = None
            if args.server_url:
                weights = WeightsChoice({}, "weights: whatever the running server loaded", False)
                client = CogClient(args.server_url)
                client.wait_until_ready(args.ready_timeout, READY_POLL_S)
            else:
                weights = choose_weights(args, stack)
                server, start_to_ready = start_local_server(
                    args.port,
                    {**weights.env, **server_env},
                    output.with_suffix(".server.log"),
                    args.ready_timeout,
                    stack,
                )
                client = server.client
            report["weights"] = {"label": weights.label, "random": weights.random, "env": weights.env}

            # the cold request counts as the first profile's first warm-up request
            total = max(args.warmup, 1) + (len(profiles) - 1) * args.warmup
            total += len(profiles) * args.repeats * len(image_batches)
            progress = stack.enter_context(tqdm(total=total, unit="req", file=sys.stderr))
            stack.enter_context(logging_redirect_tqdm())

            def on_request(sample: RequestSample) -> None:
                progress.update(1)
                progress.set_postfix_str(f"last {sample.latency_s:.1f}s{'' if sample.ok else ' FAILED'}")

            for index, profile in enumerate(profiles):
                progress.set_description(profile)
                options = request_options(profile, args.stability_mode, args.compile_backend, args.fidelity)
                requester = Requester(client, options, server)
                first: RequestSample | None = None
                if index == 0:
                    first = requester.send(image_batches[0], "cold")
                    report["cold"] = cold_figures(first, time.monotonic(), server, start_to_ready, profile)
                    on_request(first)
                samples, round_seconds = run_profile(
                    requester, image_batches, args.warmup, args.repeats, on_request, first
                )
                profile_reports[profile] = profile_report(samples, round_seconds, options)
    except (KeyboardInterrupt, ServerError) as exc:
        report["aborted"] = f"{type(exc).__name__}: {exc}"[:4000]
        write_json(report, output)
        log.error("the run stopped early; partial report in %s", output)
        raise
    report["finished_at"] = now_iso()
    write_json(report, output)
    if args.plot:
        weights_note = "RANDOM weights (seed 0)" if report["weights"]["random"] else "weights as configured"
        title = (
            f"request latency CDF: {len(images)} image(s), batch {args.batch_size}, "
            f"{args.stability_mode}/{args.compile_backend}, {weights_note}"
        )
        plot_cdf(profile_reports, args.plot, title)
    return report


if __name__ == "__main__":
    sys.exit(main())
