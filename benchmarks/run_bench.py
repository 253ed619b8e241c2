"""Latency and throughput of the Cog HTTP server, measured from a client, per runtime profile.

    python benchmarks/run_bench.py [--image-dir data] [--images 4 | --images a.jpg b.jpg]
        [--batch-size 1] [--profiles baseline fast max_speed] [--stability-mode safe]
        [--compile-backend none] [--fidelity 0.5] [--warmup 1] [--repeats 3]
        [--port 5000 | --server-url http://host:port]
        [--weights-dir DIR | --weights-url URL | --random-weights] [--server-env KEY=VALUE ...]
        [--output benchmarks/results/run_bench_<time>.json] [--plot cdf.png]
        [--concurrency 1 2 4 N [--duration-s 30 | --requests 20]]

Starts ``python -m codeformer.serving.serve`` on ``--port`` in its own process group (refusing a
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
and restored (from each prediction's metrics); errors and 409 retries; the server's own
``metrics.predict_time`` next to the client latency. A table goes to stdout, progress to
stderr, everything to ``--output`` as JSON; ``--plot`` draws the per-request latency CDF of
each profile. Exit code: 0, 1 when a request failed, 2 for a bad setting (taken port), 130
when interrupted.

Concurrency (``--concurrency K ..``): per profile, after the cold and warm-up requests, each
K in turn: K clients (threads) each send their next request as soon as the last is answered,
for ``--duration-s`` (default 30) or until ``--requests`` answers other than 409; ``N`` is
``@cog.concurrent(max=...)`` on ``Predictor.run`` (1 when absent). A 409 is not retried: it is counted
(``rejected_409``), the client pauses 0.1 s and sends its next request. JSON ``concurrency``:
``levels``, ``concurrency_max``, ``stop``, ``profiles`` {profile: {options, levels {K: requests,
succeeded, rejected_409, errors, images, wall_s, throughput_images_per_s (succeeded images /
wall), per_request, predict_time, succeeded_per_client, samples}}}; ``--repeats`` is unused.
409s are no failure of the run (exit 0); other errors are (exit 1).

``--random-weights`` writes seed-0 random weights in the official formats to a temporary
folder for the server: the timings are real, the restored faces are noise; the JSON and the
table say so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import sys
from pathlib import Path
from typing import Any

import harness

from benchmarks import load, reports
from benchmarks.load import RequestSample
from codeformer.config import COMPILE_BACKENDS, PROFILES, STABILITY_MODES
from codeformer.errors import ConfigError
from codeformer.serving.client import CogClient, ServerError
from codeformer.serving.schema import MAX_IMAGES, MIN_IMAGES
from codeformer.tools.local_server import READY_POLL_S, LocalServer

log = logging.getLogger("benchmarks.run_bench")


def render(report: dict[str, Any]) -> str:
    """The table for stdout: the run's settings, the cold start, one row per profile."""
    config, cold, sec = report["config"], report["cold"], harness.seconds
    lines = [
        f"run_bench: {len(config['images'])} image(s) from {config['image_dir']}, "
        f"batch {config['batch_size']}, warm-up {config['warmup']}, repeats {config['repeats']}; "
        f"stability_mode={config['stability_mode']} "
        f"compile_backend={config['compile_backend']} fidelity={config['fidelity']}",
        report["weights"]["label"],
        *harness.server_env_lines(config["server_env"]),
    ]
    if cold.get("start_to_ready_s") is None:
        lines.append(
            f"server: already running; first request {sec(cold['first_request_s'])} s (not a cold figure)"
        )
    else:
        setup = ""
        if cold.get("setup_load_s") is not None:
            setup = f" (setup: load {cold['setup_load_s']:.1f} s, warm-up {cold['setup_warmup_s']:.1f} s)"
        lines += [
            f"cold start on {cold.get('device') or 'unknown device'}: process start -> READY "
            f"{cold['start_to_ready_s']:.1f} s{setup}",
            f"first request ({cold['profile']}, {cold['images']} image(s)) {sec(cold['first_request_s'])} s"
            f"{'' if cold['first_request_ok'] else ' (FAILED)'}; "
            f"process start -> first response {sec(cold['start_to_first_response_s'], 1)} s",
        ]
    if "concurrency" in report:  # the sweep replaced the timed rounds
        swept = harness.render_levels(harness.swept_levels(report), report["concurrency"]["concurrency_max"])
        return "\n".join([*lines, "", swept])
    headers = [
        "profile", "req", "img", "faces", "req avg", "req p50", "req p95", "req p99",
        "img p50", "round avg", "img/s", "server p50", "errors", "retries",
    ]  # fmt: skip
    rows = [
        [name, str(p["requests"]), str(p["images"]), harness.faces_cell(p["faces"])]
        + [sec(p["per_request"][key]) for key in ("avg", "p50", "p95", "p99")]
        + [sec(p["per_image"]["p50"]), sec(p["round_totals"]["avg"]), sec(p["throughput_images_per_s"], 3)]
        + [sec(p["predict_time"]["p50"]), str(p["errors"]), str(p["retries"])]
        for name, p in report["profiles"].items()
    ]
    legend = (
        "(seconds; req = per request, img = per image, server = metrics.predict_time; faces = restored/found"
    )
    return "\n".join([*lines, "", harness.format_table(headers, rows), legend + " over one round)"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image-dir", type=Path, default=harness.PROJECT_ROOT / "data", help="default: data/"
    )
    parser.add_argument("--images", nargs="+", help="a count N (the first N photos) or file names/paths")
    parser.add_argument(
        "--batch-size", type=int, default=1, help=f"images per request, {MIN_IMAGES}-{MAX_IMAGES}"
    )
    parser.add_argument(
        "--profiles", nargs="+", default=list(PROFILES), help="runtime profiles (default: all)"
    )
    parser.add_argument("--stability-mode", default="safe", choices=list(STABILITY_MODES))
    parser.add_argument("--compile-backend", default="none", choices=list(COMPILE_BACKENDS))
    harness.add_run_arguments(parser)
    parser.add_argument(
        "--server-url", help="use this running server instead of starting one (no cold start)"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON report (default benchmarks/results/run_bench_<time>.json)"
    )
    parser.add_argument("--plot", type=Path, metavar="PNG", help="latency CDF per profile (and K)")
    harness.add_concurrency_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_arguments(build_parser(), argv)
    try:
        server_env, profiles = harness.check_run_arguments(args)
        if not MIN_IMAGES <= args.batch_size <= MAX_IMAGES:
            raise ConfigError(
                f"--batch-size must be between {MIN_IMAGES} and {MAX_IMAGES}, got {args.batch_size}"
            )
        images = load.discover_images(args.image_dir, args.images)
        load_plan = harness.check_concurrency_arguments(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return harness.EXIT_BAD_SETTING
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or harness.RESULTS_DIR / f"run_bench_{stamp}.json"
    try:
        with harness.sigterm_as_interrupt():
            report = run(args, profiles, images, server_env, output, load_plan)
    except KeyboardInterrupt:
        log.error("interrupted; the server was stopped")
        return harness.EXIT_INTERRUPTED
    except ConfigError as exc:
        log.error("%s", exc)
        return harness.EXIT_BAD_SETTING
    except ServerError as exc:
        log.error("%s", exc)
        return harness.EXIT_REQUEST_FAILED
    print(render(report))
    print(f"\nJSON: {output}" + (f"\nplot: {args.plot}" if args.plot else ""))
    swept = harness.swept_levels(report).values()
    failed = sum(p["errors"] for p in report["profiles"].values()) + sum(
        level["errors"] for levels in swept for level in levels.values()
    )
    return harness.EXIT_REQUEST_FAILED if failed else 0


def run(
    args: argparse.Namespace,
    profiles: list[str],
    images: list[Path],
    server_env: dict[str, str],
    output: Path,
    load_plan: load.LoadPlan | None = None,
) -> dict[str, Any]:
    """Measure every profile; writes the JSON report (also a partial one when the run aborts)."""
    image_batches = load.batches(images, args.batch_size)
    config = {
        key: getattr(args, key)
        for key in ("batch_size", "stability_mode", "compile_backend", "fidelity", "warmup", "repeats")
    }
    report: dict[str, Any] = {
        "tool": "run_bench",
        "started_at": reports.now_iso(),
        "command": reports.command_line(),
        "config": {
            "image_dir": reports.portable_path(args.image_dir),
            "images": [reports.portable_path(p) for p in images],
            "profiles": profiles,
            **config,
            "port": None if args.server_url else args.port,
            "server_url": args.server_url,
            "server_env": server_env,
        },
        "environment": reports.environment_info(),
        "weights": None,
        "cold": None,
        "profiles": {},
    }
    if load_plan is not None:
        report["concurrency"] = {**load_plan.as_report(), "profiles": {}}
    try:
        with contextlib.ExitStack() as stack:
            server: LocalServer | None = None
            if args.server_url:
                weights = harness.WeightsChoice({}, "weights: whatever the running server loaded", False)
                client = CogClient(args.server_url)
                client.wait_until_ready(args.ready_timeout, READY_POLL_S)
            else:
                weights = harness.choose_weights(args, stack)
                env, log_path = {**weights.env, **server_env}, output.with_suffix(".server.log")
                server = harness.start_server(args.port, env, log_path, args.ready_timeout, stack)
                client = server.client
            report["weights"] = weights.as_report()
            # the cold request counts as the first profile's first warm-up request
            total = max(args.warmup, 1) + (len(profiles) - 1) * args.warmup
            total += 0 if load_plan else len(profiles) * args.repeats * len(image_batches)
            progress, on_request = harness.progress_bar(stack, None if load_plan else total)
            for index, profile in enumerate(profiles):
                progress.set_description(profile)
                options = load.request_options(
                    profile, args.stability_mode, args.compile_backend, args.fidelity
                )
                requester = load.Requester(client, options, server)
                first: RequestSample | None = None
                if index == 0:
                    first, report["cold"] = harness.send_cold(
                        requester, image_batches[0], server, profile, on_request
                    )
                repeats = 0 if load_plan else args.repeats  # a sweep replaces the timed rounds
                samples, round_seconds = load.run_profile(
                    requester, image_batches, args.warmup, repeats, on_request, first
                )
                if load_plan is None:
                    report["profiles"][profile] = load.profile_report(samples, round_seconds, options)
                else:
                    swept = report["concurrency"]["profiles"][profile] = {
                        "options": options,
                        "warmup_requests": len(samples),
                        "warmup_errors": sum(not s.ok for s in samples),
                    }
                    swept["levels"] = load.sweep_levels(requester, image_batches, load_plan, on_request)
    except (KeyboardInterrupt, ServerError) as exc:
        report["aborted"] = f"{type(exc).__name__}: {exc}"[:4000]
        reports.write_report(report, output)
        log.error("the run stopped early; partial report in %s", output)
        raise
    report["finished_at"] = reports.now_iso()
    reports.write_report(report, output)
    if args.plot:
        weights_note = "RANDOM weights (seed 0)" if weights.random else "weights as configured"
        title = (
            f"request latency CDF: {len(images)} image(s), batch {args.batch_size}, "
            f"{args.stability_mode}/{args.compile_backend}, {weights_note}"
        )
        latencies = {
            name: [s["latency_s"] for s in profile["samples"] if s["phase"] == "timed" and s["error"] is None]
            for name, profile in report["profiles"].items()
        }
        if load_plan is not None:
            latencies = harness.latency_curves(harness.swept_levels(report))
        harness.plot_cdf(latencies, args.plot, "request latency (s)", title)
    return report


if __name__ == "__main__":
    sys.exit(main())
