"""What only the benchmark scripts share: the project root on ``sys.path``, clean stops,
weights, the HTTP benchmarks' flags, tables and plots, starting the local server and its cold
figures, the concurrency flags (in that order below).

A script runs by path (``python benchmarks/run_bench.py``), which puts ``benchmarks/`` on
``sys.path`` but not the project root; importing this module adds the root, so a script
imports ``harness`` before any project module. The code the benchmarks' tests check lives in
the ``benchmarks`` package, not here.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.load import (  # noqa: E402
    BUSY_BACKOFF_S,
    DEFAULT_DURATION_S,
    LoadPlan,
    Requester,
    RequestSample,
    StopRule,
    parse_levels,
    setup_info,
    split_names,
)
from benchmarks.reports import portable_path  # noqa: E402
from benchmarks.summary import cdf_points  # noqa: E402
from codeformer.config import PROFILES  # noqa: E402
from codeformer.errors import ConfigError  # noqa: E402
from codeformer.serving.serve import DEFAULT_HOST, check_port_free, runner_concurrency  # noqa: E402
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


# -- tables and plots ------------------------------------------------------------------------
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


# -- a server's start and its first request ---------------------------------------------------
EXIT_REQUEST_FAILED = 1
EXIT_BAD_SETTING = 2
EXIT_INTERRUPTED = 130


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
    """``restored/found`` for a table, ``-`` where the server did not say."""
    return "-" if faces["restored"] is None else f"{faces['restored']}/{faces['found']}"


def server_env_lines(server_env: dict[str, str]) -> list[str]:
    if not server_env:
        return []
    return ["server environment: " + " ".join(f"{key}={value}" for key, value in server_env.items())]


# -- concurrency flags and tables (the levels themselves: benchmarks/load.py) --------------
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
